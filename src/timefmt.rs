//! RFC 3339 UTC timestamps with a fixed width, so that text order is time order in SQLite.

use time::{format_description::well_known::Rfc3339, OffsetDateTime, PrimitiveDateTime};

/// Fixed-width format: `2026-11-29T13:19:46.123456Z` (microseconds, always present).
const FORMAT: &[time::format_description::FormatItem<'static>] = time::macros::format_description!(
    "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z"
);

/// The current time as a fixed-width RFC 3339 UTC string.
pub fn now() -> String {
    format(OffsetDateTime::now_utc())
}

/// Formats any instant as fixed-width RFC 3339 UTC.
pub fn format(t: OffsetDateTime) -> String {
    t.to_offset(time::UtcOffset::UTC)
        .format(FORMAT)
        .expect("formatting a valid UTC time cannot fail")
}

/// Parses an RFC 3339 timestamp (any offset) into UTC.
pub fn parse(s: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(s, &Rfc3339).ok().or_else(|| {
        PrimitiveDateTime::parse(s, FORMAT)
            .ok()
            .map(|p| p.assume_utc())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_width_and_round_trip() {
        let s = now();
        assert_eq!(s.len(), "2026-11-29T13:19:46.123456Z".len());
        assert!(s.ends_with('Z'));
        let t = parse(&s).unwrap();
        assert_eq!(format(t), s);
    }

    #[test]
    fn text_order_is_time_order() {
        let a = format(OffsetDateTime::from_unix_timestamp(9).unwrap());
        let b = format(OffsetDateTime::from_unix_timestamp(10).unwrap());
        assert!(a < b);
    }
}
