//! What one start of the agent created, undone if the start fails.
//!
//! The rule (docs/operations.md, "A failed start"): a start that fails leaves the node as it
//! found it. On a fresh node, where no map was pinned before, everything under the pin
//! directory is this start's and goes. On a node with a datapath of an earlier run, that
//! datapath stays and keeps forwarding (the hitless-restart promise); only attachments this
//! start added (an interface the earlier run did not have) are removed. Inputs are checked
//! before anything is created, so this only handles what fails after: loading the programs,
//! attaching them, the first list of Services.
//!
//! [`StartGuard::disarm`] marks the start complete; from then on the datapath outlives the
//! agent, whatever ends it.

use std::path::Path;

use nodeport_common::names;

use super::{AttachedInterface, InterfaceRole, PinDir, attach};

pub struct StartGuard {
    pins: PinDir,
    /// No map was pinned when this start began: everything under `pins` is this start's.
    fresh: bool,
    /// Attachments pinned when this start began (an earlier run's).
    found: Vec<AttachedInterface>,
    /// Attachments this start added to an adopted datapath.
    added: Vec<AttachedInterface>,
    armed: bool,
}

impl StartGuard {
    /// Looks at the pin directory before the start creates anything in it.
    pub fn new(root: &Path) -> Self {
        let pins = PinDir::new(root);
        let fresh = !names::ALL.iter().any(|name| pins.map(name).exists());
        // An unreadable links directory counts as empty: then nothing is taken for this
        // start's that it did not find.
        let found = attach::list_links(&pins).unwrap_or_default();
        Self {
            pins,
            fresh,
            found,
            added: Vec::new(),
            armed: true,
        }
    }

    /// Whether the datapath is this start's own (no earlier run's maps were found).
    pub fn is_fresh(&self) -> bool {
        self.fresh
    }

    /// Notes a successful attachment; one the start did not find pinned is its own.
    pub fn attached(&mut self, interface: &str, role: InterfaceRole) {
        let item = AttachedInterface {
            name: interface.to_owned(),
            role,
        };
        if !self.found.contains(&item) && !self.added.contains(&item) {
            self.added.push(item);
        }
    }

    /// The start completed: keep everything.
    pub fn disarm(mut self) {
        self.armed = false;
    }

    fn roll_back(&mut self) {
        if self.fresh {
            match super::detach(&self.pins.root) {
                Ok(removed) => tracing::warn!(
                    dir = %self.pins.root.display(),
                    removed = removed.len(),
                    "the start failed: removed the datapath it had created"
                ),
                Err(e) => tracing::error!(
                    dir = %self.pins.root.display(),
                    error = %e,
                    "the start failed and removing the datapath it had created failed too: \
                     run `nodeport-agent detach`"
                ),
            }
            return;
        }
        for a in &self.added {
            match attach::remove_attachment(&self.pins, &a.name, a.role) {
                Ok(()) => tracing::warn!(
                    interface = a.name,
                    role = ?a.role,
                    "the start failed: removed the attachment it had added"
                ),
                Err(e) => tracing::error!(
                    interface = a.name,
                    role = ?a.role,
                    error = %e,
                    "the start failed and removing the attachment it had added failed too"
                ),
            }
        }
        tracing::warn!(
            dir = %self.pins.root.display(),
            "the start failed: the datapath of the earlier run stays and keeps forwarding"
        );
    }
}

impl Drop for StartGuard {
    fn drop(&mut self) {
        if self.armed {
            self.roll_back();
        }
    }
}
