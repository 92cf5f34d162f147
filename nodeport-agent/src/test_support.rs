//! Helpers shared by unit tests.

use std::fs;
use std::path::{Path, PathBuf};

/// A scratch directory under the system temp dir, removed on drop so a failing test leaves
/// nothing behind. Names are unique per test and process, so tests run in parallel.
pub(crate) struct ScratchDir(PathBuf);

impl ScratchDir {
    pub(crate) fn new(test: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("nodeport-agent-{test}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }

    pub(crate) fn write(&self, name: &str, text: &str) -> &Self {
        let path = self.0.join(name);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
        self
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// One connection as the datapath records it, for tests of what reads the conntrack tables:
/// `client` to `frontend`, rewritten to come from `source` (the client itself, or a SNAT
/// address and port) and go to `backend`. Addresses and ports in host order.
pub(crate) struct TestConnection {
    pub table: crate::datapath::CtTable,
    pub proto: u8,
    pub client: (std::net::Ipv4Addr, u16),
    pub frontend: (std::net::Ipv4Addr, u16),
    pub source: (std::net::Ipv4Addr, u16),
    pub backend: (std::net::Ipv4Addr, u16),
    pub flags: u16,
    pub state: nodeport_common::CtState,
    /// Each entry's `last_seen`, in jiffies.
    pub forward_seen: u64,
    pub reply_seen: u64,
}

impl TestConnection {
    /// The forward and reply records.
    pub(crate) fn records(&self) -> [crate::datapath::CtRecord; 2] {
        use nodeport_common::{CT_DIR_FORWARD, CT_DIR_REPLY, CtEntry, CtKey};
        let be = |(addr, port): (std::net::Ipv4Addr, u16)| (u32::from(addr).to_be(), port.to_be());
        let (client, client_port) = be(self.client);
        let (frontend, frontend_port) = be(self.frontend);
        let (source, source_port) = be(self.source);
        let (backend, backend_port) = be(self.backend);
        let forward_key = CtKey {
            saddr_be: client,
            daddr_be: frontend,
            sport_be: client_port,
            dport_be: frontend_port,
            proto: self.proto,
            dir: CT_DIR_FORWARD,
            _pad: 0,
        };
        let forward = CtEntry {
            last_seen: self.forward_seen,
            new_saddr_be: source,
            new_daddr_be: backend,
            new_sport_be: source_port,
            new_dport_be: backend_port,
            flags: self.flags,
            state: self.state,
            ..CtEntry::default()
        };
        let reply = CtEntry {
            last_seen: self.reply_seen,
            new_saddr_be: frontend,
            new_daddr_be: client,
            new_sport_be: frontend_port,
            new_dport_be: client_port,
            ..forward
        };
        [
            crate::datapath::CtRecord {
                table: self.table,
                key: forward_key,
                entry: forward,
            },
            crate::datapath::CtRecord {
                table: self.table,
                key: forward.opposite_key(self.proto, CT_DIR_REPLY),
                entry: reply,
            },
        ]
    }
}
