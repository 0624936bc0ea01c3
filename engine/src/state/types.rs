//! The declared types of an operator's states, so a restore never reinterprets bytes
//! written as one type as another.
//!
//! Each state is described by its kind, value type(s) and key type
//! (`ValueState<i64> keyed by u32`, from [`std::any::type_name`]). Checkpoints record
//! the descriptions in the manifest (per operator, state name to description); after a
//! restore, the first use of each state in an operator instance compares its declared
//! description with the recorded one, and a difference is an error naming the operator,
//! the state and both types. The check runs once per state and instance, never per
//! record.

use crate::error::{Error, Result};
use crate::ids::OperatorId;

pub use crate::manifest::StateTypeMap;

/// What a state handle declares: its description, its version and, if it converts
/// values of an earlier version, the description of the state it converts from.
pub(crate) struct Declared {
    pub description: String,
    pub version: u32,
    pub migrates_from: Option<String>,
}

impl Declared {
    /// The description recorded in checkpoints: version 1 has no suffix (the
    /// descriptions written before versions existed).
    fn recorded(&self) -> String {
        with_version(&self.description, self.version)
    }
}

fn with_version(description: &str, version: u32) -> String {
    if version <= 1 {
        description.to_string()
    } else {
        format!("{description} version {version}")
    }
}

/// A recorded description split into the state's description and its version.
fn split_version(recorded: &str) -> (&str, u32) {
    match recorded.rsplit_once(" version ") {
        Some((d, v)) => match v.parse() {
            Ok(v) => (d, v),
            Err(_) => (recorded, 1),
        },
        None => (recorded, 1),
    }
}

/// How the restored entries of a state are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Restore {
    /// As the declared type (or nothing was restored).
    AsIs,
    /// As the type the handle migrates from, converted by its migration function.
    Migrate,
}

/// Describe a state: `kind` is `ValueState`, `ValueState with TTL` or `MapState`, `v`
/// its type parameters as written.
pub(crate) fn describe<K>(kind: &str, v: &str) -> String {
    format!("{kind}<{v}> keyed by {}", std::any::type_name::<K>())
}

/// The types recorded in the restored checkpoint and those declared since.
#[derive(Debug)]
pub(crate) struct StateTypes {
    operator: OperatorId,
    restored: StateTypeMap,
    declared: StateTypeMap,
}

impl Default for StateTypes {
    /// Nothing restored to check against (a fresh start, or a test harness).
    fn default() -> Self {
        StateTypes::new(OperatorId(String::new()), StateTypeMap::new())
    }
}

impl StateTypes {
    /// Types of `operator`'s states, checked against `restored` (empty: nothing to check).
    pub fn new(operator: OperatorId, restored: StateTypeMap) -> Self {
        StateTypes {
            operator,
            restored,
            declared: StateTypeMap::new(),
        }
    }

    /// Declare state `name`; an error if the restored checkpoint wrote it as something
    /// the declaration cannot read. [`Restore::Migrate`] when its entries were written at
    /// an earlier version, as the type the declaration migrates from.
    #[cold]
    pub fn declare(&mut self, name: &str, d: Declared) -> Result<Restore> {
        let recorded = d.recorded();
        if let Some(other) = self.declared.get(name) {
            if *other != recorded {
                return Err(Error::config(format!(
                    "operator '{}': state '{name}' is used as {other} and as {recorded}; \
                     give each state its own name",
                    self.operator
                )));
            }
        }
        let restore = match self.restored.get(name) {
            None => Restore::AsIs,
            Some(old) if *old == recorded => Restore::AsIs,
            Some(old) => self.migration(name, old, &d)?,
        };
        self.declared.insert(name.to_string(), recorded);
        Ok(restore)
    }

    /// Whether a state recorded as `old` can be restored by declaration `d`.
    #[cold]
    fn migration(&self, name: &str, old: &str, d: &Declared) -> Result<Restore> {
        let op = &self.operator;
        let (old_description, old_version) = split_version(old);
        let now = d.recorded();
        if old_version > d.version {
            return Err(Error::config(format!(
                "operator '{op}', state '{name}': the checkpoint holds {old}, written by a \
                 newer version of the job than this one ({now}); run the newer version, or \
                 restore a savepoint taken before the upgrade"
            )));
        }
        if old_version == d.version {
            return Err(Error::config(format!(
                "operator '{op}', state '{name}': the checkpoint holds {old}, the job now \
                 declares {now}. Restoring would read the old bytes as the new type; keep the \
                 old type, raise the state's version and convert the old values with \
                 migrate_from, or give the state a new name (which starts it empty)"
            )));
        }
        match &d.migrates_from {
            Some(from) if from == old_description => Ok(Restore::Migrate),
            Some(from) => Err(Error::config(format!(
                "operator '{op}', state '{name}': the checkpoint holds {old}, but the job's \
                 migration to {now} converts from {from}"
            ))),
            None => Err(Error::config(format!(
                "operator '{op}', state '{name}': the checkpoint holds {old}, the job declares \
                 {now} without a migration: add .migrate_from::<old type>(|old| ...) to the \
                 state's handle"
            ))),
        }
    }

    /// What a checkpoint records: every restored state (kept, even if this run never
    /// used it) and every declared one.
    pub fn recorded(&self) -> StateTypeMap {
        let mut all = self.restored.clone();
        all.extend(self.declared.iter().map(|(k, v)| (k.clone(), v.clone())));
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OLD: &str = "ValueState<i64> keyed by u32";
    const NEW: &str = "ValueState<Cents> keyed by u32";

    fn restored(description: &str) -> StateTypes {
        StateTypes::new(
            OperatorId("op".into()),
            [("s".to_string(), description.to_string())].into(),
        )
    }

    fn declared(description: &str, version: u32, from: Option<&str>) -> Declared {
        Declared {
            description: description.into(),
            version,
            migrates_from: from.map(str::to_string),
        }
    }

    #[test]
    fn the_same_declaration_restores_as_is() {
        let mut t = restored(OLD);
        assert_eq!(
            t.declare("s", declared(OLD, 1, None)).unwrap(),
            Restore::AsIs
        );
        assert_eq!(t.recorded()["s"], OLD);
        let mut t = restored(&format!("{NEW} version 2"));
        let d = declared(NEW, 2, Some(OLD));
        assert_eq!(t.declare("s", d).unwrap(), Restore::AsIs);
    }

    #[test]
    fn an_older_version_is_migrated_from_the_type_it_was_written_as() {
        let mut t = restored(OLD);
        let d = declared(NEW, 2, Some(OLD));
        assert_eq!(t.declare("s", d).unwrap(), Restore::Migrate);
        assert_eq!(t.recorded()["s"], format!("{NEW} version 2"));
        // From version 2 to 3, where version 2 was written with its suffix.
        let mut t = restored(&format!("{NEW} version 2"));
        let d = declared("ValueState<u128> keyed by u32", 3, Some(NEW));
        assert_eq!(t.declare("s", d).unwrap(), Restore::Migrate);
    }

    #[test]
    fn what_a_declaration_cannot_read_is_refused() {
        let cases = [
            // Another type at the same version.
            (OLD, declared(NEW, 1, None), "raise the state's version"),
            // A new version without a conversion.
            (OLD, declared(NEW, 2, None), "without a migration"),
            // A conversion from another type than the one written.
            (
                OLD,
                declared(NEW, 2, Some("ValueState<u8> keyed by u32")),
                "converts from ValueState<u8>",
            ),
            // A key type changed: no conversion of values helps.
            (
                OLD,
                declared(
                    "ValueState<Cents> keyed by u64",
                    2,
                    Some("ValueState<i64> keyed by u64"),
                ),
                "converts from",
            ),
            // A downgrade.
            (
                "ValueState<Cents> keyed by u32 version 2",
                declared(OLD, 1, None),
                "newer version of the job",
            ),
        ];
        for (old, d, says) in cases {
            let err = restored(old).declare("s", d).unwrap_err().to_string();
            assert!(err.contains(says), "{old}: {err}");
            assert!(err.contains("operator 'op', state 's'"), "{err}");
        }
    }
}
