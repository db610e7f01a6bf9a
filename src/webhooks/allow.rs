//! `SQLITE_SIM_WEBHOOK_ALLOW`: the hosts webhooks may be sent to, so that the service cannot be
//! made to probe its own network. Nothing is allowed unless listed.
//!
//! Entries are comma-separated: a host name (`hooks.example.com`), an IP address (`10.1.2.3`,
//! `::1`), either with a port (`hooks.example.com:8443`, `[::1]:8080`), or a CIDR block of IP
//! addresses (`10.0.0.0/8`, `fd00::/8`). Without a port an entry allows every port.
//!
//! Matching is on the URL's host as written, never on what a name resolves to: a name matches
//! only an entry with that very name (case-insensitive), an IP address only IP and CIDR
//! entries. So a name cannot reach an address range by resolving into it, and DNS rebinding
//! gains nothing: whoever lists a name trusts that name's DNS, exactly as listed.

use super::WebhookError;
use reqwest::Url;
use std::net::IpAddr;

/// Longest accepted callback URL, in bytes.
pub const MAX_URL: usize = 2048;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Host {
    Name(String),
    Ip(IpAddr),
    Cidr(IpAddr, u8),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    host: Host,
    port: Option<u16>,
}

/// The parsed allow list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowList {
    entries: Vec<Entry>,
    /// As configured, for messages and `sqlite-sim config`.
    raw: String,
}

impl AllowList {
    /// Parses the variable's value; an empty one allows nothing.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let mut entries = Vec::new();
        for item in raw.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            entries.push(parse_entry(item).ok_or_else(|| {
                format!(
                    "{item:?} is not a host name, an IP address, either with :port, or a CIDR \
                     block like 10.0.0.0/8"
                )
            })?);
        }
        Ok(AllowList {
            entries,
            raw: raw.trim().to_string(),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn as_str(&self) -> &str {
        &self.raw
    }

    /// Checks a callback URL: `http`, no credentials, a host this list allows. `https` is
    /// refused with its reason: the HTTP client is built without TLS (reqwest without default
    /// features), so such a delivery could never succeed.
    pub fn check(&self, url: &str) -> Result<Url, WebhookError> {
        if url.len() > MAX_URL {
            return Err(WebhookError::BadUrl(format!(
                "is {} bytes; the limit is {MAX_URL}",
                url.len()
            )));
        }
        let parsed = Url::parse(url).map_err(|e| WebhookError::BadUrl(format!("{url:?}: {e}")))?;
        match parsed.scheme() {
            "http" => {}
            "https" => {
                return Err(WebhookError::BadUrl(format!(
                    "{url:?}: https is not available, this server's HTTP client has no TLS; \
                     use http (e.g. to a TLS-terminating proxy next to the server)"
                )))
            }
            _ => {
                return Err(WebhookError::BadUrl(format!(
                    "{url:?}: the scheme must be http"
                )))
            }
        }
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(WebhookError::BadUrl(format!(
                "{url:?}: credentials in the URL are not accepted (the request's JSON shows it; \
                 the signature authenticates the sender)"
            )));
        }
        let port = parsed.port_or_known_default().unwrap_or(0);
        let host = match parsed.host() {
            Some(url::Host::Domain(d)) => Host::Name(d.to_ascii_lowercase()),
            Some(url::Host::Ipv4(a)) => Host::Ip(IpAddr::V4(a)),
            Some(url::Host::Ipv6(a)) => Host::Ip(IpAddr::V6(a)),
            None => return Err(WebhookError::BadUrl(format!("{url:?}: no host"))),
        };
        if self.entries.iter().any(|e| e.allows(&host, port)) {
            Ok(parsed)
        } else {
            Err(WebhookError::NotAllowed {
                host: format!("{}:{port}", parsed.host_str().unwrap_or_default()),
            })
        }
    }
}

impl Entry {
    fn allows(&self, host: &Host, port: u16) -> bool {
        if self.port.is_some_and(|p| p != port) {
            return false;
        }
        match (&self.host, host) {
            (Host::Name(a), Host::Name(b)) => a == b,
            (Host::Ip(a), Host::Ip(b)) => canonical(*a) == canonical(*b),
            (Host::Cidr(net, bits), Host::Ip(b)) => in_block(*net, *bits, canonical(*b)),
            _ => false,
        }
    }
}

/// IPv4-mapped IPv6 addresses (`::ffff:10.0.0.1`) compare as the IPv4 address they are.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

fn in_block(net: IpAddr, bits: u8, ip: IpAddr) -> bool {
    match (canonical(net), ip) {
        (IpAddr::V4(n), IpAddr::V4(a)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(bits)).unwrap_or(0);
            u32::from(n) & mask == u32::from(a) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(a)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(bits)).unwrap_or(0);
            u128::from(n) & mask == u128::from(a) & mask
        }
        _ => false,
    }
}

fn parse_entry(item: &str) -> Option<Entry> {
    if let Some((net, bits)) = item.split_once('/') {
        let net: IpAddr = net.parse().ok()?;
        let bits: u8 = bits.parse().ok()?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        return (bits <= max).then_some(Entry {
            host: Host::Cidr(net, bits),
            port: None,
        });
    }
    if let Ok(ip) = item.parse::<IpAddr>() {
        return Some(Entry {
            host: Host::Ip(ip),
            port: None,
        });
    }
    if let Ok(sa) = item.parse::<std::net::SocketAddr>() {
        return Some(Entry {
            host: Host::Ip(sa.ip()),
            port: Some(sa.port()),
        });
    }
    let (name, port) = match item.rsplit_once(':') {
        Some((n, p)) => (n, Some(p.parse::<u16>().ok()?)),
        None => (item, None),
    };
    let valid = !name.is_empty()
        && name.len() <= 253
        && name
            .split('.')
            .all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
    valid.then(|| Entry {
        host: Host::Name(name.to_ascii_lowercase()),
        port,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(list: &str, url: &str) -> bool {
        AllowList::parse(list).unwrap().check(url).is_ok()
    }

    #[test]
    fn nothing_is_allowed_by_default() {
        assert!(!allowed("", "http://127.0.0.1:9/x"));
        assert!(!allowed("  ", "http://example.com/"));
    }

    #[test]
    fn names_match_exactly_and_only_names() {
        assert!(allowed("hooks.example.com", "http://HOOKS.example.com/x"));
        assert!(!allowed("example.com", "http://hooks.example.com/x"));
        assert!(!allowed(
            "hooks.example.com",
            "http://hooks.example.com.evil.org/"
        ));
        // A name never matches an address block, whatever it resolves to.
        assert!(!allowed("127.0.0.0/8", "http://localhost/"));
        assert!(!allowed("localhost", "http://127.0.0.1/"));
    }

    #[test]
    fn ports_ips_and_blocks() {
        assert!(allowed(
            "hooks.example.com:8443",
            "http://hooks.example.com:8443/"
        ));
        assert!(!allowed(
            "hooks.example.com:8443",
            "http://hooks.example.com/"
        ));
        assert!(allowed("hooks.example.com:80", "http://hooks.example.com/"));
        assert!(allowed("10.1.2.3", "http://10.1.2.3:7/"));
        assert!(allowed("10.0.0.0/8", "http://10.200.0.1/"));
        assert!(!allowed("10.0.0.0/8", "http://11.0.0.1/"));
        assert!(allowed("0.0.0.0/0", "http://192.168.1.1/"));
        assert!(allowed("[::1]:8080", "http://[::1]:8080/"));
        assert!(!allowed("[::1]:8080", "http://[::1]:8081/"));
        assert!(allowed("fd00::/8", "http://[fd12::1]/"));
        assert!(allowed("127.0.0.1", "http://[::ffff:127.0.0.1]/"));
        assert!(allowed("127.0.0.1:5000", "http://127.0.0.1:5000/hook?x=1"));
    }

    #[test]
    fn urls_are_checked_before_hosts() {
        let list = AllowList::parse("127.0.0.1").unwrap();
        match list.check("https://127.0.0.1/") {
            Err(WebhookError::BadUrl(m)) => assert!(m.contains("no TLS"), "{m}"),
            other => panic!("{other:?}"),
        }
        for bad in [
            "ftp://127.0.0.1/",
            "file:///etc/passwd",
            "not a url",
            "http://user:pw@127.0.0.1/",
        ] {
            assert!(
                matches!(list.check(bad), Err(WebhookError::BadUrl(_))),
                "{bad}"
            );
        }
        let long = format!("http://127.0.0.1/{}", "a".repeat(MAX_URL));
        assert!(matches!(list.check(&long), Err(WebhookError::BadUrl(_))));
        match list.check("http://10.0.0.1:81/") {
            Err(WebhookError::NotAllowed { host }) => assert_eq!(host, "10.0.0.1:81"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_entries_are_refused() {
        for bad in [
            "10.0.0.0/33",
            "host:port",
            "a..b",
            "::1/129",
            "exa mple.com",
        ] {
            assert!(AllowList::parse(bad).is_err(), "{bad}");
        }
        assert!(AllowList::parse("a.example, 10.0.0.0/8 ,[::1]:1").is_ok());
    }
}
