//! The nodeport agent: loads the datapath, mirrors Kubernetes state into its maps, serves
//! health checks and metrics, and reports on the node port range.

pub mod agent;
pub mod config;
pub mod datapath;
pub mod desired;
pub mod dump;
pub mod gc;
pub mod health;
pub mod interfaces;
pub mod ledger;
pub mod listeners;
pub mod maglev;
pub mod manifests;
pub mod metrics;
pub mod model;
pub mod output;
pub mod privileges;
pub mod refusals;
pub mod source;
pub mod status;
pub mod switch;
pub mod sync;
#[cfg(test)]
mod test_support;
