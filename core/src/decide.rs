//! The storage API's decisions as plain functions over facts read from the database: what a
//! put, get, head or delete may do, and why not. The extension reads the facts (one query per
//! call) and acts on the decision; the order of the checks here is the order of the refusals a
//! caller sees, and each refusal maps to one documented SQLSTATE.

/// Why a call is refused. The extension turns each into its error and SQLSTATE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// `42501`: the role is in none of the vault's roles.
    NotMember { roles: &'static str },
    /// `VV428`: the purpose has no retention policy yet.
    NoRetentionPolicy,
    /// `22023`: the access policy named does not exist.
    UnknownPolicy,
    /// `VV422`: the expiry asked for lies beyond the purpose's retention limit.
    BeyondRetention,
    /// `22023`: the expiry asked for is in the past.
    ExpiryInPast,
    /// `42501`: the access policy does not let this role store under it.
    PolicyForbidsStore,
    /// `42501`: the entry belongs to another role (or its policy keeps this role from replacing it).
    OwnedByAnother,
    /// `P0002`: no such entry, and none ever destroyed.
    NotFound,
    /// `VV410`: the entry was purged, or has expired.
    Gone { why: &'static str },
    /// `42501`: the entry's access policy keeps this role from retrieving it.
    PolicyForbidsRetrieve,
    /// `42501`: the role may not purge this entry.
    PolicyForbidsPurge,
    /// `28000`: the access policy has `require_identity` and the call states no end user or
    /// service (`vsql_vault.on_behalf_of`).
    IdentityRequired,
}

/// Who a call says it acts for, against what the access policies involved ask: part of every
/// decision's facts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IdentityFacts {
    /// An access policy the call is decided under has `require_identity`.
    pub required: bool,
    /// The call states an end user or service (`vsql_vault.on_behalf_of` is set).
    pub stated: bool,
}

impl IdentityFacts {
    fn check(self) -> Result<(), Refusal> {
        if self.required && !self.stated {
            Err(Refusal::IdentityRequired)
        } else {
            Ok(())
        }
    }
}

/// What a put knows before it decides. Times are compared in SQL, where the clock is.
#[derive(Debug, Clone, Default)]
pub struct PutFacts {
    pub is_member: bool,
    pub has_retention_policy: bool,
    pub policy_exists: bool,
    pub policy_lets_store: bool,
    /// The owner of the entry already stored under this key, if any.
    pub existing_owner: Option<String>,
    /// Whether the existing entry's policy lets this role replace it.
    pub existing_policy_lets_store: bool,
    pub beyond_retention: bool,
    pub expiry_in_past: bool,
    /// `required`: the policy asked for or the existing entry's policy has `require_identity`.
    pub identity: IdentityFacts,
}

/// The refusals of a put, in order: membership, retention policy, access policy's existence,
/// identity (asked of the caller before anything about what it asks for), expiry, the policy's
/// store roles, the existing entry.
pub fn decide_put(role: &str, f: &PutFacts) -> Result<(), Refusal> {
    if !f.is_member {
        return Err(Refusal::NotMember {
            roles: "vault_app or vault_admin",
        });
    }
    if !f.has_retention_policy {
        return Err(Refusal::NoRetentionPolicy);
    }
    if !f.policy_exists {
        return Err(Refusal::UnknownPolicy);
    }
    f.identity.check()?;
    if f.beyond_retention {
        return Err(Refusal::BeyondRetention);
    }
    if f.expiry_in_past {
        return Err(Refusal::ExpiryInPast);
    }
    if !f.policy_lets_store {
        return Err(Refusal::PolicyForbidsStore);
    }
    match &f.existing_owner {
        Some(owner) if owner != role || !f.existing_policy_lets_store => {
            Err(Refusal::OwnedByAnother)
        }
        _ => Ok(()),
    }
}

/// What a get or head knows about an entry before it decides.
#[derive(Debug, Clone, Default)]
pub struct EntryFacts {
    pub is_member: bool,
    pub exists: bool,
    /// No entry, but a purge proof for this key: it existed and was destroyed.
    pub destroyed: bool,
    pub policy_lets_retrieve: bool,
    pub purged: bool,
    pub expired: bool,
    /// `required`: the entry's access policy has `require_identity`.
    pub identity: IdentityFacts,
}

/// The refusals of a get, in order: membership, existence, the policy's retrieve roles (a role
/// kept out learns nothing more), identity, the entry's state.
pub fn decide_get(f: &EntryFacts) -> Result<(), Refusal> {
    if !f.is_member {
        return Err(Refusal::NotMember {
            roles: "vault_app or vault_admin",
        });
    }
    if !f.exists {
        return Err(if f.destroyed {
            Refusal::Gone { why: "purged" }
        } else {
            Refusal::NotFound
        });
    }
    if !f.policy_lets_retrieve {
        return Err(Refusal::PolicyForbidsRetrieve);
    }
    f.identity.check()?;
    if f.purged {
        return Err(Refusal::Gone { why: "purged" });
    }
    if f.expired {
        return Err(Refusal::Gone { why: "expired" });
    }
    Ok(())
}

/// A head answers whether an entry exists; only a member the entry's policy keeps out is refused.
pub fn decide_head(f: &EntryFacts) -> Result<(), Refusal> {
    if !f.is_member {
        return Err(Refusal::NotMember {
            roles: "vault_app or vault_admin",
        });
    }
    if f.exists && !f.policy_lets_retrieve {
        return Err(Refusal::PolicyForbidsRetrieve);
    }
    if f.exists {
        f.identity.check()?;
    }
    Ok(())
}

/// What a delete knows before it decides.
#[derive(Debug, Clone, Default)]
pub struct DeleteFacts {
    /// Member of vault_app, vault_auditor or vault_admin.
    pub is_member: bool,
    pub exists: bool,
    /// Purged already, or (no entry) destroyed before.
    pub purged: bool,
    /// The owner, a role in the entry's purge roles, or an admin.
    pub may_purge: bool,
    /// `required`: the entry's access policy has `require_identity`.
    pub identity: IdentityFacts,
}

pub fn decide_delete(f: &DeleteFacts) -> Result<(), Refusal> {
    // A role outside the vault learns nothing, not even whether the entry exists.
    if !f.is_member {
        return Err(Refusal::NotMember {
            roles: "vault_app, vault_auditor or vault_admin",
        });
    }
    if !f.exists {
        return Err(if f.purged {
            Refusal::Gone { why: "purged" }
        } else {
            Refusal::NotFound
        });
    }
    if !f.may_purge {
        return Err(Refusal::PolicyForbidsPurge);
    }
    f.identity.check()?;
    if f.purged {
        return Err(Refusal::Gone { why: "purged" });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn storable() -> PutFacts {
        PutFacts {
            is_member: true,
            has_retention_policy: true,
            policy_exists: true,
            policy_lets_store: true,
            existing_owner: None,
            existing_policy_lets_store: false,
            beyond_retention: false,
            expiry_in_past: false,
            identity: IdentityFacts {
                required: true,
                stated: true,
            },
        }
    }

    #[test]
    fn put_refusals_come_in_order() {
        assert_eq!(decide_put("a", &storable()), Ok(()));
        type Fault = fn(&mut PutFacts);
        let cases: [(Fault, Refusal); 7] = [
            (
                |f| f.is_member = false,
                Refusal::NotMember {
                    roles: "vault_app or vault_admin",
                },
            ),
            (
                |f| f.has_retention_policy = false,
                Refusal::NoRetentionPolicy,
            ),
            (|f| f.policy_exists = false, Refusal::UnknownPolicy),
            (|f| f.identity.stated = false, Refusal::IdentityRequired),
            (|f| f.beyond_retention = true, Refusal::BeyondRetention),
            (|f| f.expiry_in_past = true, Refusal::ExpiryInPast),
            (|f| f.policy_lets_store = false, Refusal::PolicyForbidsStore),
        ];
        for (i, (change, refusal)) in cases.iter().enumerate() {
            let mut f = storable();
            change(&mut f);
            assert_eq!(decide_put("a", &f), Err(refusal.clone()), "case {i}");
            // Every later fault too: the earlier refusal still wins.
            for (later, _) in &cases[i + 1..] {
                later(&mut f);
            }
            assert_eq!(
                decide_put("a", &f),
                Err(refusal.clone()),
                "case {i} with later faults"
            );
        }
    }

    #[test]
    fn a_put_replaces_only_its_own_entry_and_only_if_its_policy_allows() {
        let mut f = storable();
        f.existing_owner = Some("a".into());
        f.existing_policy_lets_store = true;
        assert_eq!(decide_put("a", &f), Ok(()));
        assert_eq!(decide_put("b", &f), Err(Refusal::OwnedByAnother));
        f.existing_policy_lets_store = false;
        assert_eq!(decide_put("a", &f), Err(Refusal::OwnedByAnother));
    }

    fn readable() -> EntryFacts {
        EntryFacts {
            is_member: true,
            exists: true,
            destroyed: false,
            policy_lets_retrieve: true,
            purged: false,
            expired: false,
            identity: IdentityFacts::default(),
        }
    }

    #[test]
    fn get_decisions() {
        assert_eq!(decide_get(&readable()), Ok(()));
        let refused = |change: fn(&mut EntryFacts)| {
            let mut f = readable();
            change(&mut f);
            decide_get(&f)
        };
        assert_eq!(
            refused(|f| f.is_member = false),
            Err(Refusal::NotMember {
                roles: "vault_app or vault_admin"
            })
        );
        // Non-members learn nothing, not even that the entry is gone.
        assert!(matches!(
            refused(|f| {
                f.is_member = false;
                f.exists = false;
                f.destroyed = true
            }),
            Err(Refusal::NotMember { .. })
        ));
        assert_eq!(refused(|f| f.exists = false), Err(Refusal::NotFound));
        assert_eq!(
            refused(|f| {
                f.exists = false;
                f.destroyed = true
            }),
            Err(Refusal::Gone { why: "purged" })
        );
        assert_eq!(
            refused(|f| f.policy_lets_retrieve = false),
            Err(Refusal::PolicyForbidsRetrieve)
        );
        // The policy is checked before the entry's state: a role kept out learns not whether it expired.
        assert_eq!(
            refused(|f| {
                f.policy_lets_retrieve = false;
                f.expired = true
            }),
            Err(Refusal::PolicyForbidsRetrieve)
        );
        assert_eq!(
            refused(|f| f.purged = true),
            Err(Refusal::Gone { why: "purged" })
        );
        assert_eq!(
            refused(|f| f.expired = true),
            Err(Refusal::Gone { why: "expired" })
        );
        assert_eq!(
            refused(|f| {
                f.purged = true;
                f.expired = true
            }),
            Err(Refusal::Gone { why: "purged" })
        );
    }

    #[test]
    fn head_decisions() {
        assert_eq!(decide_head(&readable()), Ok(()));
        let mut f = readable();
        f.exists = false;
        f.policy_lets_retrieve = false;
        // A missing entry is an answer (found: false), not a refusal.
        assert_eq!(decide_head(&f), Ok(()));
        f.exists = true;
        assert_eq!(decide_head(&f), Err(Refusal::PolicyForbidsRetrieve));
        f.is_member = false;
        assert!(matches!(decide_head(&f), Err(Refusal::NotMember { .. })));
        // Expired and purged entries are reported, not refused.
        let mut f = readable();
        f.expired = true;
        f.purged = true;
        assert_eq!(decide_head(&f), Ok(()));
    }

    #[test]
    fn delete_decisions() {
        let ok = DeleteFacts {
            is_member: true,
            exists: true,
            purged: false,
            may_purge: true,
            identity: IdentityFacts::default(),
        };
        assert_eq!(decide_delete(&ok), Ok(()));
        let with = |change: fn(&mut DeleteFacts)| {
            let mut f = ok.clone();
            change(&mut f);
            decide_delete(&f)
        };
        assert_eq!(
            with(|f| {
                f.is_member = false;
                f.exists = false
            }),
            Err(Refusal::NotMember {
                roles: "vault_app, vault_auditor or vault_admin"
            })
        );
        assert_eq!(with(|f| f.exists = false), Err(Refusal::NotFound));
        assert_eq!(
            with(|f| {
                f.exists = false;
                f.purged = true
            }),
            Err(Refusal::Gone { why: "purged" })
        );
        assert_eq!(
            with(|f| f.may_purge = false),
            Err(Refusal::PolicyForbidsPurge)
        );
        assert_eq!(
            with(|f| {
                f.may_purge = false;
                f.purged = true
            }),
            Err(Refusal::PolicyForbidsPurge)
        );
        assert_eq!(
            with(|f| f.purged = true),
            Err(Refusal::Gone { why: "purged" })
        );
    }

    #[test]
    fn identity_is_asked_only_where_a_policy_requires_it() {
        let unstated = IdentityFacts {
            required: true,
            stated: false,
        };
        // Not required: nobody needs to state one; stated: whatever the policy says.
        let mut f = storable();
        f.identity = IdentityFacts::default();
        assert_eq!(decide_put("a", &f), Ok(()));
        f.identity.required = true;
        f.identity.stated = true;
        assert_eq!(decide_put("a", &f), Ok(()));
        f.identity = unstated;
        assert_eq!(decide_put("a", &f), Err(Refusal::IdentityRequired));

        let mut e = readable();
        e.identity = unstated;
        assert_eq!(decide_get(&e), Err(Refusal::IdentityRequired));
        assert_eq!(decide_head(&e), Err(Refusal::IdentityRequired));
        // A role the policy keeps out learns no more than before; missing and destroyed entries
        // are answered as before (no policy to ask it).
        e.policy_lets_retrieve = false;
        assert_eq!(decide_get(&e), Err(Refusal::PolicyForbidsRetrieve));
        assert_eq!(decide_head(&e), Err(Refusal::PolicyForbidsRetrieve));
        let mut e = readable();
        e.identity = unstated;
        e.expired = true;
        assert_eq!(decide_get(&e), Err(Refusal::IdentityRequired));
        e.exists = false;
        assert_eq!(decide_get(&e), Err(Refusal::NotFound));
        assert_eq!(decide_head(&e), Ok(()));

        let d = DeleteFacts {
            is_member: true,
            exists: true,
            purged: false,
            may_purge: true,
            identity: unstated,
        };
        assert_eq!(decide_delete(&d), Err(Refusal::IdentityRequired));
        let kept_out = DeleteFacts {
            may_purge: false,
            ..d.clone()
        };
        assert_eq!(decide_delete(&kept_out), Err(Refusal::PolicyForbidsPurge));
    }
}
