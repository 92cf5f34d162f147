//! The nodeport agent: loads the datapath, mirrors Kubernetes state into its maps, serves
//! health checks and metrics, and reports on the node port range.

pub mod datapath;
pub mod maglev;
