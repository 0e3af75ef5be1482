//! Which way each class of bytes goes, and why: a pure rule over the plan, the node each rank
//! runs on, and (only when it matters) what every rank reported of its GPU.
//!
//! Every piece of the plan falls in one [`Class`] by where its bytes go: read and written by
//! one rank (`local`), between two ranks of one node (`same_node`), or between nodes
//! (`cross_node`). [`route`] gives each class a [`Path`]:
//!
//! | `--transport` | local | same node | cross node |
//! |---|---|---|---|
//! | `auto` | CPU | MPI, else TCP | NCCL when every rank has a GPU and NCCL, else MPI, else TCP |
//! | `tcp` | CPU | TCP | TCP |
//! | `mpi` | CPU | MPI | MPI |
//! | `nccl` | GPU | NCCL | NCCL |
//!
//! On one node the disk, not the copy, is the limit: a GPU there only adds two PCIe copies (and
//! a CUDA context, a kernel build and pinned buffers), so `auto` keeps a save in which nothing
//! crosses nodes off the GPU entirely and asks no rank about its GPU ([`needs_caps`]). Where
//! bytes cross nodes NCCL carries them over the fabric (InfiniBand, RoCE, NVLink) and converts
//! them on the GPU they land on; the other classes stay on the host. `--transport nccl` forces
//! the GPU path for everything, as before.

use crate::plan::{Assignment, Plan};
use crate::transport::{Caps, Transport, TransportRequest, select};

/// Where a piece's bytes go.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    /// Read and written by the same rank.
    Local,
    /// From a rank to another rank of the same node.
    SameNode,
    /// From a rank to a rank on another node.
    CrossNode,
}

impl Class {
    /// Every class, in the order reports list them.
    pub const ALL: [Class; 3] = [Class::Local, Class::SameNode, Class::CrossNode];

    /// The class of one assignment, `nodes[r]` naming rank r's node.
    pub fn of(a: &Assignment, nodes: &[String]) -> Class {
        if a.reader == a.writer {
            Class::Local
        } else if nodes.get(a.reader).is_some() && nodes.get(a.reader) == nodes.get(a.writer) {
            Class::SameNode
        } else {
            Class::CrossNode
        }
    }

    /// The name in the log and in `--json` (`local`, `same_node`, `cross_node`).
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Local => "local",
            Class::SameNode => "same_node",
            Class::CrossNode => "cross_node",
        }
    }
}

/// Output bytes of each class.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClassBytes {
    /// Read and written by one rank.
    pub local: u64,
    /// Between ranks of one node.
    pub same_node: u64,
    /// Between nodes.
    pub cross_node: u64,
}

impl ClassBytes {
    /// The bytes of `class`.
    pub fn get(&self, class: Class) -> u64 {
        match class {
            Class::Local => self.local,
            Class::SameNode => self.same_node,
            Class::CrossNode => self.cross_node,
        }
    }
}

/// Counts the plan's output bytes by class (`nodes[r]`: rank r's node).
pub fn classify(plan: &Plan, nodes: &[String]) -> ClassBytes {
    let mut c = ClassBytes::default();
    for a in &plan.assignments {
        match Class::of(a, nodes) {
            Class::Local => c.local += a.bytes,
            Class::SameNode => c.same_node += a.bytes,
            Class::CrossNode => c.cross_node += a.bytes,
        }
    }
    c
}

/// What moves a class of bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Path {
    /// This process reads, converts on the CPU and writes.
    Cpu,
    /// This process reads, converts on its GPU and writes.
    Gpu,
    /// TCP connections between ranks (the CPU converts).
    Tcp,
    /// MPI messages between ranks (the CPU converts).
    Mpi,
    /// NCCL between GPUs (the receiving GPU converts).
    Nccl,
}

impl Path {
    /// The name in the log and in `--json`.
    pub fn as_str(self) -> &'static str {
        match self {
            Path::Cpu => "cpu",
            Path::Gpu => "gpu",
            Path::Tcp => "tcp",
            Path::Mpi => "mpi",
            Path::Nccl => "nccl",
        }
    }

    fn of(t: Transport) -> Path {
        match t {
            Transport::Tcp => Path::Tcp,
            Transport::Mpi => Path::Mpi,
            Transport::Nccl => Path::Nccl,
        }
    }
}

/// One class's way and the reason.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Leg {
    /// The class.
    pub class: Class,
    /// Its output bytes in this save.
    pub bytes: u64,
    /// What moves them.
    pub path: Path,
    /// Why, in a few words.
    pub why: String,
}

/// The way of every class of bytes in one save.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// Local, same node, cross node, in that order.
    pub legs: [Leg; 3],
}

impl Route {
    /// The leg of `class`.
    pub fn leg(&self, class: Class) -> &Leg {
        &self.legs[class as usize]
    }

    /// The transport between ranks, as the report's `transport` names it: the cross-node
    /// one when bytes cross nodes, else the same-node one.
    pub fn transport(&self) -> Transport {
        let leg = if self.leg(Class::CrossNode).bytes > 0 {
            self.leg(Class::CrossNode)
        } else {
            self.leg(Class::SameNode)
        };
        match leg.path {
            Path::Nccl | Path::Gpu => Transport::Nccl,
            Path::Mpi => Transport::Mpi,
            Path::Cpu | Path::Tcp => Transport::Tcp,
        }
    }

    /// Whether NCCL carries every class (`--transport nccl`: the GPU executor does it all).
    pub fn all_nccl(&self) -> bool {
        self.leg(Class::SameNode).path == Path::Nccl && self.leg(Class::Local).path == Path::Gpu
    }

    /// Whether NCCL carries the cross-node bytes while the host moves the rest (`auto`).
    pub fn split(&self) -> bool {
        !self.all_nccl()
            && self.leg(Class::CrossNode).path == Path::Nccl
            && self.leg(Class::CrossNode).bytes > 0
    }

    /// The host transport for the bytes NCCL does not carry (`None` under `--transport
    /// nccl`).
    pub fn host_transport(&self) -> Option<Transport> {
        if self.all_nccl() {
            return None;
        }
        Some(match self.leg(Class::SameNode).path {
            Path::Mpi => Transport::Mpi,
            _ => Transport::Tcp,
        })
    }

    /// One line per class with bytes, for the log: "cross_node 1.2 GiB over nccl (every rank
    /// has a GPU and NCCL)".
    pub fn lines(&self) -> Vec<String> {
        self.legs
            .iter()
            .filter(|l| l.bytes > 0)
            .map(|l| {
                format!(
                    "{} {} by {} ({})",
                    l.class.as_str(),
                    crate::size::human(l.bytes),
                    l.path.as_str(),
                    l.why
                )
            })
            .collect()
    }
}

/// Whether [`route`] needs every rank's [`Caps`]: only for `--transport nccl`, and for `auto`
/// when bytes cross nodes. Otherwise no rank looks for a GPU (no CUDA is initialised).
pub fn needs_caps(request: TransportRequest, bytes: &ClassBytes) -> bool {
    match request {
        TransportRequest::Nccl => true,
        TransportRequest::Auto => bytes.cross_node > 0,
        TransportRequest::Tcp | TransportRequest::Mpi => false,
    }
}

/// The way of each class for `request`, given the bytes of each class, every rank's
/// capabilities (`caps[r]`, read only when [`needs_caps`]) and whether MPI is available. `Err`
/// says why an explicit request cannot be met.
///
/// Rule (see the module's table): a rank's own pieces go by the CPU unless `--transport nccl`
/// forces the GPU; bytes between ranks of one node take the host transport (MPI when
/// available under `auto`, else TCP); bytes between nodes take NCCL under `auto` when every
/// rank has a GPU and NCCL, else the host transport. An explicit `tcp`, `mpi` or `nccl` takes
/// that transport for everything between ranks.
pub fn route(
    request: TransportRequest,
    bytes: ClassBytes,
    caps: &[Caps],
    mpi: bool,
) -> Result<Route, crate::transport::Unavailable> {
    let leg = |class: Class, path: Path, why: &str| Leg {
        class,
        bytes: bytes.get(class),
        path,
        why: why.to_string(),
    };
    let own = "read and written by one rank";
    let legs = match request {
        TransportRequest::Nccl => {
            select(request, caps, mpi)?;
            [
                leg(Class::Local, Path::Gpu, "--transport nccl"),
                leg(Class::SameNode, Path::Nccl, "--transport nccl"),
                leg(Class::CrossNode, Path::Nccl, "--transport nccl"),
            ]
        }
        TransportRequest::Tcp | TransportRequest::Mpi => {
            let c = select(request, &[], mpi)?;
            let path = Path::of(c.transport);
            [
                leg(Class::Local, Path::Cpu, own),
                leg(Class::SameNode, path, &c.why),
                leg(Class::CrossNode, path, &c.why),
            ]
        }
        TransportRequest::Auto => {
            let (host, host_name) = if mpi {
                (Path::Mpi, "MPI started the job")
            } else {
                (Path::Tcp, "no MPI launcher")
            };
            let same = format!("between ranks of one node the host is cheapest; {host_name}");
            let cross = if bytes.cross_node == 0 {
                leg(Class::CrossNode, host, "nothing crosses nodes")
            } else {
                let c = select(TransportRequest::Auto, caps, mpi)?;
                if c.transport == Transport::Nccl {
                    leg(Class::CrossNode, Path::Nccl, &c.why)
                } else {
                    leg(Class::CrossNode, host, &c.why)
                }
            };
            [
                leg(Class::Local, Path::Cpu, own),
                leg(Class::SameNode, host, &same),
                cross,
            ]
        }
    };
    Ok(Route { legs })
}

/// The plan restricted to the assignments `keep` accepts (the files and their writers stay).
pub fn restrict(plan: &Plan, keep: impl Fn(&Assignment) -> bool) -> Plan {
    Plan {
        assignments: plan
            .assignments
            .iter()
            .filter(|a| keep(a))
            .copied()
            .collect(),
        ..plan.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::execute::Task;
    use crate::plan::Mode;

    fn caps_gpu() -> Caps {
        Caps {
            gpu: Ok("0: GPU".into()),
            nccl: Ok("2.28.3".into()),
            gpu_id: None,
            shared_gpu_ok: false,
        }
    }

    fn plan(pairs: &[(usize, usize, u64)]) -> Plan {
        Plan {
            mode: Mode::Gather,
            world_size: 4,
            file_writers: vec![0],
            assignments: pairs
                .iter()
                .enumerate()
                .map(|(i, &(reader, writer, bytes))| Assignment {
                    task: Task { out: i, piece: 0 },
                    reader,
                    writer,
                    bytes,
                })
                .collect(),
        }
    }

    /// Two nodes of two ranks each.
    fn nodes() -> Vec<String> {
        ["a", "a", "b", "b"].map(String::from).to_vec()
    }

    #[test]
    fn pieces_fall_in_classes_by_where_their_bytes_go() {
        let p = plan(&[(0, 0, 1), (1, 0, 10), (2, 0, 100), (3, 0, 1000), (3, 2, 5)]);
        let c = classify(&p, &nodes());
        assert_eq!(
            c,
            ClassBytes {
                local: 1,
                same_node: 15,
                cross_node: 1100
            }
        );
        // A rank whose node is unknown counts as another node.
        assert_eq!(Class::of(&p.assignments[1], &[]), Class::CrossNode);
    }

    #[test]
    fn auto_on_one_node_never_asks_for_a_gpu() {
        let bytes = ClassBytes {
            local: 5,
            same_node: 7,
            cross_node: 0,
        };
        assert!(!needs_caps(TransportRequest::Auto, &bytes));
        // No capabilities at all: the rule does not look.
        let r = route(TransportRequest::Auto, bytes, &[], false).unwrap();
        assert_eq!(r.leg(Class::Local).path, Path::Cpu);
        assert_eq!(r.leg(Class::SameNode).path, Path::Tcp);
        assert_eq!(r.leg(Class::CrossNode).why, "nothing crosses nodes");
        assert_eq!(r.transport(), Transport::Tcp);
        assert!(!r.split() && !r.all_nccl());
        // Under mpirun the host way is MPI.
        let r = route(TransportRequest::Auto, bytes, &[], true).unwrap();
        assert_eq!(r.leg(Class::SameNode).path, Path::Mpi);
        assert_eq!(r.host_transport(), Some(Transport::Mpi));
    }

    #[test]
    fn auto_sends_cross_node_bytes_over_nccl_only_when_every_rank_can() {
        let bytes = ClassBytes {
            local: 5,
            same_node: 7,
            cross_node: 9,
        };
        assert!(needs_caps(TransportRequest::Auto, &bytes));
        let all = vec![caps_gpu(); 4];
        let r = route(TransportRequest::Auto, bytes, &all, false).unwrap();
        assert_eq!(r.leg(Class::CrossNode).path, Path::Nccl);
        // The rest stays on the host.
        assert_eq!(r.leg(Class::Local).path, Path::Cpu);
        assert_eq!(r.leg(Class::SameNode).path, Path::Tcp);
        assert!(r.split() && !r.all_nccl());
        assert_eq!(r.transport(), Transport::Nccl);
        assert_eq!(r.host_transport(), Some(Transport::Tcp));
        // One rank without a GPU: everything on the host, and the reason names it.
        let mut some = all.clone();
        some[3] = Caps::none("no CUDA driver");
        let r = route(TransportRequest::Auto, bytes, &some, false).unwrap();
        assert_eq!(r.leg(Class::CrossNode).path, Path::Tcp);
        assert!(r.leg(Class::CrossNode).why.contains("rank 3"), "{r:?}");
        assert!(!r.split());
    }

    #[test]
    fn explicit_transports_carry_everything_between_ranks() {
        let bytes = ClassBytes {
            local: 1,
            same_node: 2,
            cross_node: 3,
        };
        let r = route(TransportRequest::Tcp, bytes, &[], true).unwrap();
        assert_eq!(
            r.legs.iter().map(|l| l.path).collect::<Vec<_>>(),
            [Path::Cpu, Path::Tcp, Path::Tcp]
        );
        assert!(route(TransportRequest::Mpi, bytes, &[], false).is_err());
        let r = route(
            TransportRequest::Nccl,
            bytes,
            &[caps_gpu(), caps_gpu()],
            false,
        )
        .unwrap();
        assert!(r.all_nccl() && !r.split());
        assert_eq!(r.host_transport(), None);
        assert_eq!(r.leg(Class::Local).path, Path::Gpu);
        let e = route(
            TransportRequest::Nccl,
            bytes,
            &[Caps::none("no GPU")],
            false,
        );
        assert!(
            e.unwrap_err()
                .to_string()
                .contains("--transport nccl needs a GPU")
        );
    }

    #[test]
    fn the_log_names_each_class_with_bytes() {
        let bytes = ClassBytes {
            local: 2048,
            same_node: 0,
            cross_node: 0,
        };
        let r = route(TransportRequest::Auto, bytes, &[], false).unwrap();
        assert_eq!(
            r.lines(),
            ["local 2.05 KB by cpu (read and written by one rank)"]
        );
    }

    #[test]
    fn restricting_a_plan_keeps_its_files() {
        let p = plan(&[(0, 0, 1), (2, 0, 100)]);
        let cross = restrict(&p, |a| Class::of(a, &nodes()) == Class::CrossNode);
        assert_eq!(cross.assignments.len(), 1);
        assert_eq!(cross.network_bytes(), 100);
        assert_eq!(cross.file_writers, p.file_writers);
    }
}
