//! The signature a receiver checks: `sha256=` and the lower-case hex HMAC-SHA256 of the exact
//! body bytes, keyed with `SQLITE_SIM_WEBHOOK_SECRET` (the scheme GitHub's webhooks use, so
//! receivers' existing verifiers work).

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The header carrying [`signature`].
pub const SIGNATURE_HEADER: &str = "X-Sqlite-Sim-Signature";
/// The header carrying the delivery's id, the same on every attempt.
pub const DELIVERY_HEADER: &str = "X-Sqlite-Sim-Delivery";
/// The header naming the event (`finished`).
pub const EVENT_HEADER: &str = "X-Sqlite-Sim-Event";

/// `sha256=<hex HMAC-SHA256 of body keyed with secret>`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256=");
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 4231, test cases 1 and 2.
    #[test]
    fn matches_the_rfc_4231_vectors() {
        assert_eq!(
            signature(&[0x0b; 20], b"Hi There"),
            "sha256=b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"
        );
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn depends_on_key_and_body() {
        let a = signature(b"k", b"body");
        assert_ne!(a, signature(b"k2", b"body"));
        assert_ne!(a, signature(b"k", b"body "));
        assert_eq!(a, signature(b"k", b"body"));
    }
}
