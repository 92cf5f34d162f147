//! Helpers for tests of the agent's pieces: manifests to desired state, pinned datapaths that
//! clean up after themselves.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use nodeport_agent::{
    datapath::{Sizing, kernel_hz},
    desired::{NodeContext, desired_state},
    model::{Desired, Ipv4Prefix},
    sync::GlobalSettings,
};
use nodeport_common::DatapathConfig;
use serde::Deserialize as _;

/// Services and EndpointSlices from a multi-document YAML string.
pub fn objects(yaml: &str) -> (Vec<Service>, Vec<EndpointSlice>) {
    let mut services = Vec::new();
    let mut slices = Vec::new();
    for doc in serde_norway::Deserializer::from_str(yaml) {
        let value = serde_norway::Value::deserialize(doc).expect("valid YAML");
        match value.get("kind").and_then(|k| k.as_str()) {
            Some("Service") => services.push(serde_norway::from_value(value).expect("a Service")),
            Some("EndpointSlice") => {
                slices.push(serde_norway::from_value(value).expect("an EndpointSlice"))
            }
            None => {}
            other => panic!("unexpected kind {other:?}"),
        }
    }
    (services, slices)
}

pub fn desired(yaml: &str, node_name: &str, node_addresses: &[Ipv4Addr]) -> Desired {
    let (services, slices) = objects(yaml);
    let node = NodeContext {
        node_name: node_name.into(),
        zone: String::new(),
        node_addresses: node_addresses.to_vec(),
        node_addresses_v6: Vec::new(),
        proxy_name: None,
        guard: Default::default(),
        source_ranges_on_node_ports: false,
    };
    desired_state(&services, &slices, &node)
}

/// Map sizes small enough for quick tests with a few services.
pub fn small_sizing() -> Sizing {
    Sizing {
        frontends: 64,
        services: 32,
        backends: 64,
        maglev_size: 31,
        source_ranges: 32,
        conntrack: 1024,
        conntrack_new: 256,
        affinity: 64,
    }
}

/// Global settings matching `small_sizing`: SNAT on `node_ip` of the external interface.
pub fn test_settings(ext_ifindex: u32, node_ip: Ipv4Addr) -> GlobalSettings {
    GlobalSettings {
        config: DatapathConfig {
            maglev_size: 31,
            hash_seed: 7,
            snat_port_min: 61000,
            snat_port_max: 61999,
            tcp_syn_timeout_s: 60,
            tcp_established_timeout_s: 21600,
            tcp_closing_timeout_s: 10,
            udp_timeout_s: 60,
            hz: kernel_hz(),
            snat_secret: 0x5eed_5eed,
            snat_port_min2: 0,
            snat_port_max2: 0,
        },
        snat_addrs: [(ext_ifindex, node_ip)].into(),
        local_nets: [Ipv4Prefix::host(node_ip)].into(),
    }
}

/// A unique pin directory under /sys/fs/bpf, detached and removed on drop (also on panic).
pub struct PinDirGuard {
    pub path: PathBuf,
}

impl PinDirGuard {
    pub fn new(tag: &str) -> Self {
        Self {
            path: PathBuf::from("/sys/fs/bpf").join(crate::netns::unique_name(tag)),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PinDirGuard {
    fn drop(&mut self) {
        if let Err(e) = nodeport_agent::datapath::detach(&self.path) {
            eprintln!("warning: cleaning {}: {e}", self.path.display());
        }
        // detach stops at the first link it cannot remove: whatever pins are left go too
        // (removing a pin drops the kernel object with its last reference).
        if self.path.exists() {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}
