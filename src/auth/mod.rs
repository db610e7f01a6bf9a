//! Who a caller is and what they may do: principals, their one [`Role`] each, bearer tokens
//! (generated from the OS random source, stored only as a SHA-256 digest), constant-time
//! comparison, and the permission check ([`Principal::may`]) that the API's access layer
//! applies to every operation. Nothing here touches the network or the store.
//!
//! Why SHA-256 and not a password hash (argon2, bcrypt): a token carries 256 bits drawn from
//! the OS random source, so there is no dictionary to try and no brute force within reach; a
//! slow hash protects low-entropy secrets, and would only cost every API call milliseconds. A
//! leaked database still reveals no usable token: the digest cannot be reversed.

use rand::TryRngCore;
use sha2::Digest;
use std::fmt;
use std::str::FromStr;
use thiserror::Error;

/// Bytes of randomness in a token: 256 bits (the contract asks for at least 128).
const TOKEN_BYTES: usize = 32;
/// Every generated token starts with this, so a leaked one is recognisable (secret scanners,
/// logs) and never mistaken for `SQLITE_SIM_API_TOKEN`'s free-form value.
pub const TOKEN_PREFIX: &str = "sqs_";
/// The principal `SQLITE_SIM_API_TOKEN` authenticates as; no stored token may take the name.
pub const ENV_PRINCIPAL: &str = "admin";
/// The principal of every caller while authentication is off.
pub const ANONYMOUS: &str = "anonymous";

#[derive(Debug, Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("unknown role {0:?}; roles: viewer, submitter, operator, admin")]
    UnknownRole(String),
    #[error("{0:?} is not a token name: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")]
    InvalidName(String),
    #[error("the name {ENV_PRINCIPAL:?} is SQLITE_SIM_API_TOKEN's principal; choose another")]
    ReservedName,
    #[error("{0:?} is not a duration: use a whole number with s, m, h, d or w (e.g. 90d)")]
    InvalidDuration(String),
    #[error("the OS random source failed: {0}")]
    Random(String),
}

/// What a token may do; each role may do everything the ones before it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Read everything: requests, logs, artifacts, consoles (watching), VMs, hosts, metrics.
    Viewer,
    /// A viewer that may submit requests, and control and delete its own.
    Submitter,
    /// A submitter that may control and delete any request, prune, build and delete
    /// templates, and read the audit log.
    Operator,
    /// Everything, including tokens.
    Admin,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Viewer, Role::Submitter, Role::Operator, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Submitter => "submitter",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = AuthError;
    fn from_str(s: &str) -> Result<Self, AuthError> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| AuthError::UnknownRole(s.chars().take(40).collect()))
    }
}

impl serde::Serialize for Role {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for Role {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl utoipa::PartialSchema for Role {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::schema::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .enum_values(Some(Role::ALL.map(Role::as_str)))
            .description(Some(
                "`viewer` reads everything; `submitter` also submits, and controls and deletes \
                 its own requests; `operator` also controls and deletes any request, prunes, \
                 builds and deletes templates and reads the audit log; `admin` also manages \
                 tokens.",
            ))
            .into()
    }
}

impl utoipa::ToSchema for Role {}

/// A token's (and so a principal's) name: a VM name's rules, so it is safe in a path, a
/// query, a log line.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TokenName(String);

impl TokenName {
    /// A name a stored token may take (not [`ENV_PRINCIPAL`]).
    pub fn new(s: &str) -> Result<Self, AuthError> {
        if !crate::config::vm::is_valid_vm_name(s) {
            return Err(AuthError::InvalidName(s.chars().take(80).collect()));
        }
        if s == ENV_PRINCIPAL {
            return Err(AuthError::ReservedName);
        }
        Ok(TokenName(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TokenName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A freshly generated token: shown once, then only its [`digest`] is kept.
pub struct Secret(String);

impl Secret {
    /// `sqs_` and 32 bytes from the OS random source, base64url without padding.
    pub fn generate() -> Result<Secret, AuthError> {
        use base64::Engine;
        let mut bytes = [0u8; TOKEN_BYTES];
        rand::rngs::OsRng
            .try_fill_bytes(&mut bytes)
            .map_err(|e| AuthError::Random(e.to_string()))?;
        let body = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        Ok(Secret(format!("{TOKEN_PREFIX}{body}")))
    }

    /// The token itself, to show the one time it is created.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// Never prints the token.
impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// The stored form of a token: lower-case hex SHA-256.
pub fn digest(token: &str) -> String {
    sha2::Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Compares without an early exit, so timing does not reveal how much of a guess was right.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u8 | u8::from(a.len() != b.len());
    for (i, x) in a.iter().enumerate() {
        diff |= x ^ b.get(i % b.len().max(1)).copied().unwrap_or(0);
    }
    diff == 0
}

/// `90d`, `12h`, `30m`, `45s`, `2w` as seconds.
pub fn parse_duration(s: &str) -> Result<u64, AuthError> {
    let bad = || AuthError::InvalidDuration(s.chars().take(40).collect());
    let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().map_err(|_| bad())?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => return Err(bad()),
    };
    n.checked_mul(mult).filter(|v| *v > 0).ok_or_else(bad)
}

/// Who is calling, once authenticated (or anyone, while authentication is off).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub name: String,
    pub role: Role,
    /// False while authentication is off: the caller is [`ANONYMOUS`] and may do everything.
    pub authenticated: bool,
}

/// What an operation needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permission {
    /// Reads.
    Read,
    /// `POST /requests`.
    Submit,
    /// Control or delete one request: its submitter, or an operator.
    ControlRequest,
    /// Prune, templates, the audit log.
    Operate,
    /// Tokens.
    Administer,
}

impl Permission {
    /// The least role that may do this to any request (a submitter may control its own).
    pub fn least_role(self) -> Role {
        match self {
            Permission::Read => Role::Viewer,
            Permission::Submit => Role::Submitter,
            Permission::ControlRequest | Permission::Operate => Role::Operator,
            Permission::Administer => Role::Admin,
        }
    }

    /// For people (the OpenAPI document, a 403's message).
    pub fn describe(self) -> &'static str {
        match self {
            Permission::Read => "any role (viewer and up)",
            Permission::Submit => "submitter, operator or admin",
            Permission::ControlRequest => {
                "operator or admin, or the submitter token that submitted the request"
            }
            Permission::Operate => "operator or admin",
            Permission::Administer => "admin",
        }
    }
}

impl Principal {
    /// Every caller while authentication is off.
    pub fn anonymous() -> Principal {
        Principal {
            name: ANONYMOUS.into(),
            role: Role::Admin,
            authenticated: false,
        }
    }

    /// The name a request submitted by this caller records (`None` with auth off).
    pub fn submitter_name(&self) -> Option<String> {
        self.authenticated.then(|| self.name.clone())
    }

    /// May this caller do `what`? `owner` is the `submitted_by` of the request a
    /// [`Permission::ControlRequest`] is about (`None` when unknown or anonymous).
    pub fn may(&self, what: Permission, owner: Option<&str>) -> bool {
        if self.role >= what.least_role() {
            return true;
        }
        what == Permission::ControlRequest
            && self.role == Role::Submitter
            && owner.is_some_and(|o| o == self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_are_ordered_and_parse() {
        for r in Role::ALL {
            assert_eq!(r.as_str().parse::<Role>().unwrap(), r);
        }
        assert!(Role::Viewer < Role::Submitter && Role::Operator < Role::Admin);
        assert!("root".parse::<Role>().is_err());
    }

    #[test]
    fn permissions() {
        let p = |role| Principal {
            name: "ci".into(),
            role,
            authenticated: true,
        };
        use Permission::*;
        assert!(p(Role::Viewer).may(Read, None));
        assert!(!p(Role::Viewer).may(Submit, None));
        assert!(!p(Role::Viewer).may(ControlRequest, Some("ci")));
        assert!(p(Role::Submitter).may(ControlRequest, Some("ci")));
        assert!(!p(Role::Submitter).may(ControlRequest, Some("other")));
        assert!(!p(Role::Submitter).may(ControlRequest, None));
        assert!(!p(Role::Submitter).may(Operate, None));
        assert!(p(Role::Operator).may(ControlRequest, Some("other")));
        assert!(!p(Role::Operator).may(Administer, None));
        assert!(p(Role::Admin).may(Administer, None));
        assert!(Principal::anonymous().may(Administer, None));
    }

    #[test]
    fn tokens_are_random_and_hashed() {
        let a = Secret::generate().unwrap();
        let b = Secret::generate().unwrap();
        assert_ne!(a.expose(), b.expose());
        assert!(a.expose().starts_with(TOKEN_PREFIX));
        // 32 bytes in base64url: 43 characters.
        assert_eq!(a.expose().len(), TOKEN_PREFIX.len() + 43);
        assert_eq!(digest(a.expose()).len(), 64);
        assert_ne!(digest(a.expose()), digest(b.expose()));
        assert!(!format!("{a:?}").contains(a.expose()));
    }

    #[test]
    fn names_and_durations() {
        assert!(TokenName::new("ci-main").is_ok());
        assert_eq!(TokenName::new("admin"), Err(AuthError::ReservedName));
        assert!(TokenName::new("a b").is_err());
        assert_eq!(parse_duration("90d").unwrap(), 90 * 86_400);
        assert_eq!(parse_duration("45s").unwrap(), 45);
        assert_eq!(parse_duration("2w").unwrap(), 14 * 86_400);
        for bad in ["", "d", "90", "0d", "9x", "-1d", "1.5h"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn constant_time_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secre", b"secret"));
        assert!(!constant_time_eq(b"", b"secret"));
        assert!(!constant_time_eq(b"secretsecret", b"secret"));
    }
}
