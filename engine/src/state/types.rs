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
use std::collections::BTreeMap;

/// State name to type description, as recorded for one operator.
pub type StateTypeMap = BTreeMap<String, String>;

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

    /// Declare state `name` as `description`; an error if the restored checkpoint wrote
    /// it as something else.
    #[cold]
    pub fn declare(&mut self, name: &str, description: String) -> Result<()> {
        if let Some(other) = self.declared.get(name) {
            if *other != description {
                return Err(Error::config(format!(
                    "operator '{}': state '{name}' is used as {other} and as {description}; \
                     give each state its own name",
                    self.operator
                )));
            }
        }
        if let Some(old) = self.restored.get(name) {
            if *old != description {
                return Err(Error::config(format!(
                    "operator '{}', state '{name}': the checkpoint holds {old}, the job now \
                     declares {description}. Restoring would read the old bytes as the new \
                     type; keep the old type, or give the state a new name (which starts it \
                     empty)",
                    self.operator
                )));
            }
        }
        self.declared.insert(name.to_string(), description);
        Ok(())
    }

    /// What a checkpoint records: every restored state (kept, even if this run never
    /// used it) and every declared one.
    pub fn recorded(&self) -> StateTypeMap {
        let mut all = self.restored.clone();
        all.extend(self.declared.iter().map(|(k, v)| (k.clone(), v.clone())));
        all
    }
}
