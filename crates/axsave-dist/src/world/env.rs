//! Environment lookup helpers and the launcher-independent core of a world.

use super::{Launcher, WorldError};

/// The lookup with parsing helpers; empty values count as unset.
pub(super) struct Env<'a> {
    pub(super) lookup: &'a dyn Fn(&str) -> Option<String>,
}

impl Env<'_> {
    pub(super) fn get(&self, var: &str) -> Option<String> {
        (self.lookup)(var).filter(|v| !v.is_empty())
    }

    pub(super) fn has(&self, var: &str) -> bool {
        self.get(var).is_some()
    }

    /// The first of `vars` that is set, with its name.
    pub(super) fn first(&self, vars: &[&'static str]) -> Option<(&'static str, String)> {
        vars.iter()
            .find_map(|&v| self.get(v).map(|value| (v, value)))
    }

    pub(super) fn number(&self, var: &'static str) -> Result<Option<usize>, WorldError> {
        self.get(var)
            .map(|value| parse_number(var, &value))
            .transpose()
    }

    /// The first of `vars` that is set, parsed, with its name.
    pub(super) fn first_number(
        &self,
        vars: &[&'static str],
    ) -> Result<Option<(&'static str, usize)>, WorldError> {
        match self.first(vars) {
            Some((var, value)) => Ok(Some((var, parse_number(var, &value)?))),
            None => Ok(None),
        }
    }
}

pub(super) fn parse_number(var: &'static str, value: &str) -> Result<usize, WorldError> {
    let t = value.trim();
    if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
        return Err(WorldError::NotANumber {
            var,
            value: value.to_owned(),
        });
    }
    t.parse().map_err(|_| WorldError::NotANumber {
        var,
        value: value.to_owned(),
    })
}

/// The launcher-specific part of a [`World`], before the endpoint is worked out.
pub(super) struct Core {
    pub(super) launcher: Launcher,
    pub(super) rank: usize,
    pub(super) rank_var: &'static str,
    pub(super) world_size: usize,
    pub(super) size_var: &'static str,
    pub(super) local_rank: usize,
    pub(super) local_rank_var: &'static str,
    pub(super) local_world_size: usize,
    pub(super) local_size_var: &'static str,
    pub(super) node_rank: Option<usize>,
    pub(super) run_id: Option<String>,
    pub(super) use_agent_store: bool,
    pub(super) restart_count: u32,
}

impl Core {
    pub(super) fn single() -> Core {
        Core {
            launcher: Launcher::Single,
            rank: 0,
            rank_var: "rank",
            world_size: 1,
            size_var: "world size",
            local_rank: 0,
            local_rank_var: "local rank",
            local_world_size: 1,
            local_size_var: "local world size",
            node_rank: Some(0),
            run_id: None,
            use_agent_store: false,
            restart_count: 0,
        }
    }

    pub(super) fn validate(&self) -> Result<(), WorldError> {
        if self.world_size == 0 {
            return Err(WorldError::EmptyWorld { var: self.size_var });
        }
        if self.local_world_size == 0 {
            return Err(WorldError::EmptyWorld {
                var: self.local_size_var,
            });
        }
        if self.rank >= self.world_size {
            return Err(WorldError::RankOutOfRange {
                launcher: self.launcher,
                rank_var: self.rank_var,
                rank: self.rank,
                size_var: self.size_var,
                size: self.world_size,
            });
        }
        if self.local_world_size > self.world_size {
            return Err(WorldError::LocalWorldTooLarge {
                launcher: self.launcher,
                local_var: self.local_size_var,
                local: self.local_world_size,
                world: self.world_size,
            });
        }
        if self.local_rank >= self.local_world_size {
            return Err(WorldError::RankOutOfRange {
                launcher: self.launcher,
                rank_var: self.local_rank_var,
                rank: self.local_rank,
                size_var: self.local_size_var,
                size: self.local_world_size,
            });
        }
        Ok(())
    }

    /// `Some(0)` when every rank is on this node, else unknown.
    pub(super) fn node_if_all_local(world_size: usize, local_world_size: usize) -> Option<usize> {
        (world_size == local_world_size).then_some(0)
    }
}

pub(super) fn required(
    env: &Env<'_>,
    var: &'static str,
    launcher: Launcher,
    because: &'static str,
) -> Result<usize, WorldError> {
    env.number(var)?.ok_or(WorldError::Missing {
        var,
        launcher,
        because,
    })
}
