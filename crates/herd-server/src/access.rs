//! Who may do what: roles, entitlements and project scope, as pure decisions.
//!
//! Every API route asks one question of a [`Principal`]: may this caller take this
//! [`Perm`] in this project? Keeping the answer here, free of HTTP and SQL, makes the
//! whole policy one table that tests can enumerate. The answer separates *hidden* from
//! *forbidden*: a caller with no role in a project learns nothing about it, not even
//! that an object exists there, so the API turns [`Denied::Hidden`] into a 404 and only
//! [`Denied::Forbidden`] (a member lacking a right) into a 403.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A role granted in one project. Ordered: each role has every right of the ones below.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[derive(utoipa::ToSchema)]
pub enum Role {
    Viewer,
    Member,
    Admin,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Viewer, Role::Member, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Member => "member",
            Role::Admin => "admin",
        }
    }

    pub fn parse(text: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|role| role.as_str() == text)
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A right inside one project.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Perm {
    /// See the project, its VMs, their events, its quota and rate card.
    Read,
    /// See a VM's bill.
    ReadBill,
    /// Launch, act on and delete VMs.
    OperateVms,
    /// Read a VM's serial console, which may hold secrets the workload printed.
    ReadConsole,
    /// Grant and revoke roles in the project, read its audit log.
    Administer,
}

/// The entitlements: the least role that holds each right.
pub const ENTITLEMENTS: [(Perm, Role); 5] = [
    (Perm::Read, Role::Viewer),
    (Perm::ReadBill, Role::Viewer),
    (Perm::OperateVms, Role::Member),
    (Perm::ReadConsole, Role::Member),
    (Perm::Administer, Role::Admin),
];

/// Whether `role` holds `perm`.
pub fn entitled(role: Role, perm: Perm) -> bool {
    ENTITLEMENTS
        .iter()
        .any(|&(p, least)| p == perm && role >= least)
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// The caller has no role where the object lives: answer as if it did not exist.
    Hidden,
    /// The caller can see the object but lacks the right.
    Forbidden,
}

/// An authenticated user with the roles they hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub user: String,
    /// A cloud-wide admin: every right in every project, and the cloud itself (hosts,
    /// users, projects, quotas, prices).
    pub cloud_admin: bool,
    pub roles: BTreeMap<String, Role>,
}

impl Principal {
    /// May this caller take `perm` in `project`?
    pub fn check(&self, project: &str, perm: Perm) -> Result<(), Denied> {
        if self.cloud_admin {
            return Ok(());
        }
        match self.roles.get(project) {
            None => Err(Denied::Hidden),
            Some(&role) if entitled(role, perm) => Ok(()),
            Some(_) => Err(Denied::Forbidden),
        }
    }

    /// Cloud-wide operations (hosts, users, projects, quotas, prices).
    pub fn check_cloud_admin(&self) -> Result<(), Denied> {
        if self.cloud_admin {
            Ok(())
        } else {
            Err(Denied::Forbidden)
        }
    }

    /// The projects whose objects this caller may list with `perm`; `None` means all.
    pub fn scope(&self, perm: Perm) -> Option<Vec<String>> {
        if self.cloud_admin {
            return None;
        }
        Some(
            self.roles
                .iter()
                .filter(|&(_, &role)| entitled(role, perm))
                .map(|(project, _)| project.clone())
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(roles: &[(&str, Role)]) -> Principal {
        Principal {
            user: "u".into(),
            cloud_admin: false,
            roles: roles.iter().map(|&(p, r)| (p.to_owned(), r)).collect(),
        }
    }

    #[test]
    fn roles_are_ordered_and_each_includes_the_one_below() {
        for (perm, least) in ENTITLEMENTS {
            for role in Role::ALL {
                assert_eq!(entitled(role, perm), role >= least, "{role} {perm:?}");
            }
        }
    }

    #[test]
    fn another_project_is_hidden_and_a_missing_right_is_forbidden() {
        let viewer = user(&[("a", Role::Viewer)]);
        assert_eq!(viewer.check("a", Perm::Read), Ok(()));
        assert_eq!(viewer.check("a", Perm::OperateVms), Err(Denied::Forbidden));
        assert_eq!(viewer.check("b", Perm::Read), Err(Denied::Hidden));
        assert_eq!(viewer.check_cloud_admin(), Err(Denied::Forbidden));
        let admin = Principal {
            cloud_admin: true,
            ..user(&[])
        };
        assert_eq!(admin.check("b", Perm::Administer), Ok(()));
        assert_eq!(admin.scope(Perm::Read), None);
    }

    #[test]
    fn scope_lists_only_projects_with_the_right() {
        let u = user(&[("a", Role::Viewer), ("b", Role::Member), ("c", Role::Admin)]);
        assert_eq!(
            u.scope(Perm::OperateVms),
            Some(vec!["b".into(), "c".into()])
        );
        assert_eq!(u.scope(Perm::Administer), Some(vec!["c".into()]));
        assert_eq!(Role::parse("member"), Some(Role::Member));
        assert_eq!(Role::parse("root"), None);
    }
}
