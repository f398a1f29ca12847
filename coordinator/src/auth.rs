//! Bearer tokens: one for clients (`JobService`), one for workers
//! (`WorkerService`). A call without a valid token is refused
//! (`UNAUTHENTICATED`); a call with the other role's token is refused as
//! `PERMISSION_DENIED`, so a leaked worker token cannot submit or cancel
//! jobs, and a client token cannot impersonate a worker. With no tokens
//! configured (local `distill run`, tests) every call is let through.

use crate::error::CoordinatorError;

/// Who a service is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Client,
    Worker,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Client => "client",
            Role::Worker => "worker",
        }
    }
}

/// The configured tokens (`None`: that role is not authenticated).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tokens {
    pub client: Option<String>,
    pub worker: Option<String>,
}

/// Compares without an early exit, so timing does not leak a prefix.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

impl Tokens {
    /// Checks an `authorization` header value for a call to `role`'s API.
    pub fn check(&self, role: Role, header: Option<&str>) -> Result<(), CoordinatorError> {
        let (mine, theirs) = match role {
            Role::Client => (&self.client, &self.worker),
            Role::Worker => (&self.worker, &self.client),
        };
        let Some(mine) = mine else { return Ok(()) };
        let Some(header) = header else {
            return Err(CoordinatorError::Unauthenticated(format!(
                "missing bearer token for the {} api",
                role.name()
            )));
        };
        let Some(token) = header.strip_prefix("Bearer ") else {
            return Err(CoordinatorError::Unauthenticated(
                "authorization must be \"Bearer <token>\"".into(),
            ));
        };
        if same(token, mine) {
            return Ok(());
        }
        if theirs.as_deref().is_some_and(|t| same(token, t)) {
            let other = match role {
                Role::Client => Role::Worker,
                Role::Worker => Role::Client,
            };
            return Err(CoordinatorError::PermissionDenied(format!(
                "a {} token cannot call the {} api",
                other.name(),
                role.name()
            )));
        }
        Err(CoordinatorError::Unauthenticated(
            "unknown bearer token".into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn roles_are_kept_apart() {
        let t = Tokens {
            client: Some("c-secret".into()),
            worker: Some("w-secret".into()),
        };
        let code = |role, h: Option<&str>| t.check(role, h).err().map(|e| e.code());
        assert_eq!(code(Role::Client, Some("Bearer c-secret")), None);
        assert_eq!(code(Role::Worker, Some("Bearer w-secret")), None);
        assert_eq!(
            code(Role::Client, Some("Bearer w-secret")),
            Some(Code::PermissionDenied)
        );
        assert_eq!(
            code(Role::Worker, Some("Bearer c-secret")),
            Some(Code::PermissionDenied)
        );
        assert_eq!(code(Role::Client, None), Some(Code::Unauthenticated));
        assert_eq!(
            code(Role::Client, Some("c-secret")),
            Some(Code::Unauthenticated)
        );
        assert_eq!(
            code(Role::Worker, Some("Bearer w-secreT")),
            Some(Code::Unauthenticated)
        );
        let msg = t
            .check(Role::Client, Some("Bearer w-secret"))
            .unwrap_err()
            .to_string();
        assert_eq!(
            msg,
            "permission denied: a worker token cannot call the client api"
        );
        assert!(
            Tokens::default().check(Role::Worker, None).is_ok(),
            "open when unset"
        );
    }
}
