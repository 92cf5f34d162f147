pub mod ledger;
pub mod manifests;
#[cfg(test)]
mod test_support;
