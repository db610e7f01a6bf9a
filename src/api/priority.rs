//! Who may ask for which `priority`: the whole range for operators and admins (and for
//! everyone while authentication is off, when every caller acts as admin), up to
//! `SQLITE_SIM_MAX_SUBMITTER_PRIORITY` for submitters. The range itself is checked with the
//! rest of the body (`requests::validate`); this is the caller's allowance within it.

use super::error::ApiError;
use crate::auth::{Principal, Role};
use crate::model::MAX_PRIORITY;

/// The highest priority `who` may give a request.
pub fn allowance(who: &Principal, max_submitter: i32) -> i32 {
    if who.role >= Role::Operator {
        MAX_PRIORITY
    } else {
        max_submitter
    }
}

/// `403 forbidden` when `priority` is above `who`'s allowance.
pub fn check(who: &Principal, priority: i32, max_submitter: i32) -> Result<(), ApiError> {
    let allowed = allowance(who, max_submitter);
    if priority <= allowed {
        return Ok(());
    }
    Err(ApiError::Forbidden(format!(
        "priority {priority} is above the allowance of {} ({}): submitters may use at most \
         {allowed} (SQLITE_SIM_MAX_SUBMITTER_PRIORITY); operators and admins up to {MAX_PRIORITY}",
        who.name,
        who.role.as_str(),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(role: Role) -> Principal {
        Principal {
            name: "x".into(),
            role,
            authenticated: true,
        }
    }

    #[test]
    fn submitters_are_capped_and_operators_are_not() {
        assert!(check(&p(Role::Submitter), 0, 0).is_ok());
        assert!(check(&p(Role::Submitter), -100, 0).is_ok());
        let e = check(&p(Role::Submitter), 1, 0).unwrap_err();
        assert!(
            matches!(&e, ApiError::Forbidden(m) if m.contains("at most 0")),
            "{e}"
        );
        assert!(check(&p(Role::Submitter), 5, 5).is_ok());
        assert!(check(&p(Role::Operator), MAX_PRIORITY, 0).is_ok());
        assert!(check(&p(Role::Admin), MAX_PRIORITY, -3).is_ok());
        assert!(check(&Principal::anonymous(), MAX_PRIORITY, 0).is_ok());
    }
}
