//! The memory flags every model-running command shares.

use moeflux::experts::plan::{parse_size, Budget};

/// `--mem` / `--expert-cache`.
#[derive(clap::Args, Debug, Clone)]
pub struct MemArgs {
    /// Total memory moeflux may use: dense weights, KV cache, scratch and
    /// the expert cache together (e.g. 8G, 512M). Default: the machine's
    /// available memory less a safety margin.
    #[arg(long, value_name = "SIZE", conflicts_with = "expert_cache")]
    pub mem: Option<String>,

    /// Size of the expert cache alone (e.g. 4G), or `min` for the smallest
    /// that works (one layer's top-k experts).
    #[arg(long, value_name = "SIZE|min")]
    pub expert_cache: Option<String>,
}

impl MemArgs {
    /// The budget the flags describe; `None` means the automatic plan.
    pub fn budget(&self) -> anyhow::Result<Option<Budget>> {
        if let Some(m) = &self.mem {
            return Ok(Some(Budget::Total(
                parse_size(m).map_err(anyhow::Error::msg)?,
            )));
        }
        match self.expert_cache.as_deref() {
            None => Ok(None),
            Some("min") => Ok(Some(Budget::ExpertCacheMin)),
            Some(s) => Ok(Some(Budget::ExpertCache(
                parse_size(s).map_err(anyhow::Error::msg)?,
            ))),
        }
    }
}
