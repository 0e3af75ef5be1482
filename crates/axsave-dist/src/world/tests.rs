use super::launchers::tasks_on_node;
use super::*;
use std::collections::HashMap;

fn world(vars: &[(&str, &str)]) -> Result<World, WorldError> {
    let map: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    detect(&move |k| map.get(k).cloned())
}

fn ok(vars: &[(&str, &str)]) -> World {
    world(vars).unwrap_or_else(|e| panic!("{e}"))
}

const TORCHRUN: &[(&str, &str)] = &[
    ("TORCHELASTIC_RUN_ID", "4a02af58"),
    ("RANK", "3"),
    ("WORLD_SIZE", "8"),
    ("LOCAL_RANK", "1"),
    ("LOCAL_WORLD_SIZE", "2"),
    ("GROUP_RANK", "1"),
    ("MASTER_ADDR", "localhost"),
    ("MASTER_PORT", "37295"),
    ("TORCHELASTIC_USE_AGENT_STORE", "True"),
    ("TORCHELASTIC_RESTART_COUNT", "2"),
];

fn with(
    base: &[(&'static str, &'static str)],
    extra: &[(&'static str, &'static str)],
) -> Vec<(&'static str, &'static str)> {
    let mut v: Vec<_> = base
        .iter()
        .filter(|(k, _)| !extra.iter().any(|(e, _)| e == k))
        .copied()
        .collect();
    v.extend_from_slice(extra);
    v
}

#[test]
fn nothing_is_single() {
    let w = ok(&[]);
    assert_eq!(w, World::single());
    assert!(!w.is_distributed());
    assert!(!w.hosts_store());
}

#[test]
fn launcher_names() {
    let names: Vec<String> = [
        Launcher::Torchrun,
        Launcher::Slurm,
        Launcher::OpenMpi,
        Launcher::Mpich,
        Launcher::Mvapich,
        Launcher::Env,
        Launcher::Single,
    ]
    .iter()
    .map(|l| l.to_string())
    .collect();
    assert_eq!(
        names,
        [
            "torchrun", "slurm", "openmpi", "mpich", "mvapich", "env", "single"
        ]
    );
}

#[test]
fn torchrun_agent_store() {
    let w = ok(TORCHRUN);
    assert_eq!(
        w,
        World {
            rank: 3,
            world_size: 8,
            local_rank: 1,
            local_world_size: 2,
            node_rank: Some(1),
            launcher: Launcher::Torchrun,
            master_addr: Some("localhost".into()),
            master_port: 37295,
            run_id: Some("4a02af58".into()),
            use_agent_store: true,
            restart_count: 2,
        }
    );
    assert!(!w.hosts_store());
    assert_eq!(w.store_namespace(), "axsave/4a02af58/2");
}

#[test]
fn torchrun_agent_store_flag_is_exact() {
    for v in ["true", "1", "False", "TRUE"] {
        let w = ok(&with(
            TORCHRUN,
            &[("TORCHELASTIC_USE_AGENT_STORE", v), ("RANK", "0")],
        ));
        assert!(!w.use_agent_store, "{v}");
        assert!(w.hosts_store());
    }
}

#[test]
fn torchrun_under_srun_ignores_slurm() {
    // `srun torchrun`: SLURM_PROCID is the agent index, SLURM_NTASKS the agent count.
    let w = ok(&with(
        TORCHRUN,
        &[
            ("SLURM_STEP_ID", "0"),
            ("SLURM_PROCID", "1"),
            ("SLURM_NTASKS", "4"),
            ("SLURM_LOCALID", "0"),
            ("SLURM_NODEID", "1"),
            ("SLURM_STEP_TASKS_PER_NODE", "1(x4)"),
            ("SLURM_JOB_ID", "123456"),
            ("SLURM_STEP_NODELIST", "n[1-4]"),
        ],
    ));
    assert_eq!(w.launcher, Launcher::Torchrun);
    assert_eq!((w.rank, w.world_size, w.local_rank), (3, 8, 1));
    assert_eq!(w.master_addr.as_deref(), Some("localhost"));
    assert_eq!(w.master_port, 37295);
}

#[test]
fn torchrun_missing_vars() {
    let only_id = world(&[("TORCHELASTIC_RUN_ID", "x")]).unwrap_err();
    assert_eq!(
        only_id,
        WorldError::Missing {
            var: "RANK",
            launcher: Launcher::Torchrun,
            because: "TORCHELASTIC_RUN_ID is set"
        }
    );
    let no_group: Vec<_> = TORCHRUN
        .iter()
        .filter(|(k, _)| *k != "GROUP_RANK")
        .copied()
        .collect();
    assert!(matches!(
        world(&no_group),
        Err(WorldError::Missing {
            var: "GROUP_RANK",
            ..
        })
    ));
    let msg = only_id.to_string();
    assert!(msg.contains("RANK") && msg.contains("torchrun"), "{msg}");
}

#[test]
fn torchrun_static_defaults() {
    // torch 2.9.1, static rendezvous: run id is the literal "none", no restart count given.
    let w = ok(&[
        ("TORCHELASTIC_RUN_ID", "none"),
        ("RANK", "0"),
        ("WORLD_SIZE", "2"),
        ("LOCAL_RANK", "0"),
        ("LOCAL_WORLD_SIZE", "2"),
        ("GROUP_RANK", "0"),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", "29500"),
        ("TORCHELASTIC_USE_AGENT_STORE", "True"),
    ]);
    assert_eq!(w.restart_count, 0);
    assert_eq!(w.store_namespace(), "axsave/none/0");
}

#[test]
fn malformed_numbers_are_errors() {
    let e = world(&with(TORCHRUN, &[("RANK", "three")])).unwrap_err();
    assert_eq!(
        e,
        WorldError::NotANumber {
            var: "RANK",
            value: "three".into()
        }
    );
    assert!(e.to_string().contains("RANK=\"three\""));
    assert!(matches!(
        world(&with(TORCHRUN, &[("WORLD_SIZE", "-1")])),
        Err(WorldError::NotANumber {
            var: "WORLD_SIZE",
            ..
        })
    ));
    assert!(matches!(
        world(&with(TORCHRUN, &[("LOCAL_RANK", "1.0")])),
        Err(WorldError::NotANumber { .. })
    ));
    assert!(matches!(
        world(&with(TORCHRUN, &[("RANK", "99999999999999999999999")])),
        Err(WorldError::NotANumber { .. })
    ));
    // Surrounding blanks are tolerated.
    assert_eq!(ok(&with(TORCHRUN, &[("RANK", " 4 ")])).rank, 4);
}

#[test]
fn rank_out_of_range() {
    let e = world(&with(TORCHRUN, &[("RANK", "8")])).unwrap_err();
    assert!(matches!(
        e,
        WorldError::RankOutOfRange {
            rank: 8,
            size: 8,
            rank_var: "RANK",
            ..
        }
    ));
    assert!(matches!(
        world(&with(TORCHRUN, &[("LOCAL_RANK", "2")])),
        Err(WorldError::RankOutOfRange {
            rank_var: "LOCAL_RANK",
            ..
        })
    ));
    assert!(matches!(
        world(&with(TORCHRUN, &[("WORLD_SIZE", "0"), ("RANK", "0")])),
        Err(WorldError::EmptyWorld { var: "WORLD_SIZE" })
    ));
    assert!(matches!(
        world(&with(TORCHRUN, &[("LOCAL_WORLD_SIZE", "9")])),
        Err(WorldError::LocalWorldTooLarge {
            local: 9,
            world: 8,
            ..
        })
    ));
}

const SLURM_STEP: &[(&str, &str)] = &[
    ("SLURM_JOB_ID", "4321987"),
    ("SLURM_STEP_ID", "0"),
    ("SLURM_PROCID", "6"),
    ("SLURM_NTASKS", "7"),
    ("SLURM_STEP_NUM_TASKS", "7"),
    ("SLURM_LOCALID", "0"),
    ("SLURM_NODEID", "3"),
    ("SLURM_STEP_TASKS_PER_NODE", "2(x3),1"),
    ("SLURM_TASKS_PER_NODE", "8(x4)"),
    ("SLURM_STEP_NODELIST", "gpu[07-10]"),
    ("SLURM_JOB_NODELIST", "gpu[01-10]"),
];

#[test]
fn slurm_step() {
    let w = ok(SLURM_STEP);
    assert_eq!(
        w,
        World {
            rank: 6,
            world_size: 7,
            local_rank: 0,
            local_world_size: 1,
            node_rank: Some(3),
            launcher: Launcher::Slurm,
            master_addr: Some("gpu07".into()),
            master_port: 15000 + 1987,
            run_id: Some("4321987.0".into()),
            use_agent_store: false,
            restart_count: 0,
        }
    );
    assert!(!w.hosts_store());
    let w = ok(&with(
        SLURM_STEP,
        &[
            ("SLURM_PROCID", "1"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_NODEID", "0"),
        ],
    ));
    assert_eq!((w.local_world_size, w.node_rank), (2, Some(0)));
}

#[test]
fn slurm_fallbacks() {
    // Without the step-level variables, the job-level ones are used.
    let vars: Vec<_> = SLURM_STEP
        .iter()
        .filter(|(k, _)| {
            !matches!(
                *k,
                "SLURM_STEP_NUM_TASKS" | "SLURM_STEP_TASKS_PER_NODE" | "SLURM_STEP_NODELIST"
            )
        })
        .copied()
        .collect();
    let w = ok(&with(
        &vars,
        &[
            ("SLURM_NTASKS", "32"),
            ("SLURM_PROCID", "30"),
            ("SLURM_LOCALID", "6"),
        ],
    ));
    assert_eq!((w.world_size, w.local_world_size), (32, 8));
    assert_eq!(w.master_addr.as_deref(), Some("gpu01"));
    let w = ok(&with(
        &vars,
        &[
            ("SLURM_NTASKS", "32"),
            ("MASTER_ADDR", "head"),
            ("MASTER_PORT", "1234"),
        ],
    ));
    assert_eq!(
        (w.master_addr.as_deref(), w.master_port),
        (Some("head"), 1234)
    );
}

#[test]
fn slurm_errors() {
    assert!(matches!(
        world(&with(SLURM_STEP, &[("SLURM_NODEID", "4")])),
        Err(WorldError::NodeOutOfRange {
            node: 4,
            nodes: 4,
            ..
        })
    ));
    assert!(matches!(
        world(&with(SLURM_STEP, &[("SLURM_STEP_TASKS_PER_NODE", "2(3)")])),
        Err(WorldError::BadTasksPerNode { .. })
    ));
    assert!(matches!(
        world(&with(SLURM_STEP, &[("SLURM_STEP_NODELIST", "gpu[07-10")])),
        Err(WorldError::Hostlist {
            var: "SLURM_STEP_NODELIST",
            ..
        })
    ));
    assert!(matches!(
        world(&with(SLURM_STEP, &[("SLURM_PROCID", "7")])),
        Err(WorldError::RankOutOfRange {
            rank: 7,
            size: 7,
            ..
        })
    ));
    let no_localid: Vec<_> = SLURM_STEP
        .iter()
        .filter(|(k, _)| *k != "SLURM_LOCALID")
        .copied()
        .collect();
    assert!(matches!(
        world(&no_localid),
        Err(WorldError::Missing {
            var: "SLURM_LOCALID",
            launcher: Launcher::Slurm,
            ..
        })
    ));
    assert!(matches!(
        world(&with(SLURM_STEP, &[("SLURM_JOB_ID", "12a")])),
        Err(WorldError::BadPort {
            var: "SLURM_JOB_ID",
            ..
        })
    ));
    assert!(matches!(
        world(&with(SLURM_STEP, &[("MASTER_PORT", "70000")])),
        Err(WorldError::BadPort {
            var: "MASTER_PORT",
            ..
        })
    ));
    assert!(matches!(
        world(&with(SLURM_STEP, &[("MASTER_PORT", "0")])),
        Err(WorldError::BadPort { .. })
    ));
}

#[test]
fn sbatch_script_without_step_is_single() {
    let w = ok(&[
        ("SLURM_JOB_ID", "77"),
        ("SLURM_PROCID", "0"),
        ("SLURM_NTASKS", "16"),
        ("SLURM_TASKS_PER_NODE", "8(x2)"),
        ("SLURM_JOB_NODELIST", "n[1-2]"),
        ("SLURM_NODEID", "0"),
    ]);
    assert_eq!(w.launcher, Launcher::Single);
    assert_eq!(w.world_size, 1);
    assert_eq!(w.master_addr.as_deref(), Some("127.0.0.1"));
    // Inside a job the port still follows the job id.
    assert_eq!(w.master_port, 15077);
}

#[test]
fn tasks_per_node_syntax() {
    let t = |v, n| tasks_on_node("V", v, n);
    assert_eq!(t("4", 0), Ok(4));
    assert_eq!(t("2(x3),1", 2), Ok(2));
    assert_eq!(t("2(x3),1", 3), Ok(1));
    assert_eq!(t("1,2(x2),3", 2), Ok(2));
    assert_eq!(t("1,2(x2),3", 3), Ok(3));
    assert!(matches!(
        t("2(x3),1", 4),
        Err(WorldError::NodeOutOfRange { nodes: 4, .. })
    ));
    for bad in [
        "",
        "x",
        "2(x)",
        "2(x0)",
        "2x3",
        "2(x3",
        "(x3)",
        "-1",
        "2(x99999999)",
    ] {
        assert!(
            matches!(t(bad, 0), Err(WorldError::BadTasksPerNode { .. })),
            "{bad:?}"
        );
    }
}

const OMPI: &[(&str, &str)] = &[
    ("OMPI_COMM_WORLD_RANK", "5"),
    ("OMPI_COMM_WORLD_SIZE", "8"),
    ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
    ("OMPI_COMM_WORLD_LOCAL_SIZE", "4"),
    ("OMPI_COMM_WORLD_NODE_RANK", "1"),
    ("PMIX_RANK", "5"),
    ("PMIX_NAMESPACE", "prterun-host-1234@1"),
];

#[test]
fn open_mpi() {
    let w = ok(OMPI);
    assert_eq!(
        w,
        World {
            rank: 5,
            world_size: 8,
            local_rank: 1,
            local_world_size: 4,
            node_rank: None,
            launcher: Launcher::OpenMpi,
            master_addr: None,
            master_port: 29500,
            run_id: Some("prterun-host-1234@1".into()),
            use_agent_store: false,
            restart_count: 0,
        }
    );
    // One node: loopback and node 0.
    let w = ok(&with(
        OMPI,
        &[
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "8"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "5"),
        ],
    ));
    assert_eq!(
        (w.master_addr.as_deref(), w.node_rank),
        (Some("127.0.0.1"), Some(0))
    );
    let w = ok(&with(
        OMPI,
        &[("MASTER_ADDR", "head"), ("MASTER_PORT", "6000")],
    ));
    assert_eq!(
        (w.master_addr.as_deref(), w.master_port),
        (Some("head"), 6000)
    );
}

#[test]
fn mpirun_inside_sbatch_mpi_wins() {
    // A process started by an orted that srun launched: the SLURM_* variables describe the
    // daemon step (one task per node, excluding mpirun's node).
    let w = ok(&with(
        OMPI,
        &[
            ("SLURM_JOB_ID", "555123"),
            ("SLURM_STEP_ID", "0"),
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "1"),
            ("SLURM_STEP_NUM_TASKS", "1"),
            ("SLURM_LOCALID", "0"),
            ("SLURM_NODEID", "0"),
            ("SLURM_STEP_TASKS_PER_NODE", "1"),
            ("SLURM_STEP_NODELIST", "n2"),
            ("SLURM_JOB_NODELIST", "n[1-2]"),
        ],
    ));
    assert_eq!(w.launcher, Launcher::OpenMpi);
    assert_eq!(
        (w.rank, w.world_size, w.local_rank, w.local_world_size),
        (5, 8, 1, 4)
    );
    // The job's first node, not the daemon step's.
    assert_eq!(w.master_addr.as_deref(), Some("n1"));
    assert_eq!(w.master_port, 15000 + 5123);
    // Malformed leaked Slurm step variables do not matter either.
    let w = ok(&with(
        OMPI,
        &[("SLURM_STEP_ID", "0"), ("SLURM_PROCID", "zz")],
    ));
    assert_eq!(w.launcher, Launcher::OpenMpi);
}

#[test]
fn srun_with_mpi_plugin_is_slurm() {
    // srun --mpi=pmi2: PMI_RANK/PMI_SIZE agree with the step.
    let w = ok(&with(
        SLURM_STEP,
        &[("PMI_RANK", "6"), ("PMI_SIZE", "7"), ("PMI_FD", "5")],
    ));
    assert_eq!(w.launcher, Launcher::Slurm);
    assert_eq!((w.rank, w.local_world_size, w.node_rank), (6, 1, Some(3)));
    // srun --mpi=pmix: PMIX_RANK has no size of its own; the step supplies it.
    let w = ok(&with(
        SLURM_STEP,
        &[("PMIX_RANK", "6"), ("PMIX_NAMESPACE", "slurm.pmix.1.0")],
    ));
    assert_eq!(w.launcher, Launcher::Slurm);
    assert_eq!(w.world_size, 7);
}

#[test]
fn pmix_without_size_is_an_error() {
    assert!(matches!(
        world(&[("PMIX_RANK", "0"), ("PMIX_NAMESPACE", "ns")]),
        Err(WorldError::Missing {
            launcher: Launcher::OpenMpi,
            ..
        })
    ));
}

#[test]
fn mpich_hydra() {
    let w = ok(&[
        ("PMI_RANK", "3"),
        ("PMI_SIZE", "4"),
        ("PMI_FD", "6"),
        ("MPI_LOCALRANKID", "1"),
        ("MPI_LOCALNRANKS", "2"),
        ("MASTER_ADDR", "node0"),
    ]);
    assert_eq!(w.launcher, Launcher::Mpich);
    assert_eq!(
        (w.rank, w.world_size, w.local_rank, w.local_world_size),
        (3, 4, 1, 2)
    );
    assert_eq!(w.master_addr.as_deref(), Some("node0"));
    // Cray PALS names.
    let w = ok(&[
        ("PMI_RANK", "1"),
        ("PMI_SIZE", "2"),
        ("PMI_LOCAL_RANK", "1"),
        ("PMI_LOCAL_SIZE", "2"),
    ]);
    assert_eq!((w.local_rank, w.node_rank), (1, Some(0)));
    assert!(matches!(
        world(&[("PMI_RANK", "1"), ("PMI_SIZE", "2")]),
        Err(WorldError::Missing {
            var: "MPI_LOCALRANKID",
            launcher: Launcher::Mpich,
            ..
        })
    ));
    assert!(matches!(
        world(&[
            ("PMI_RANK", "2"),
            ("PMI_SIZE", "2"),
            ("MPI_LOCALRANKID", "0"),
            ("MPI_LOCALNRANKS", "1")
        ]),
        Err(WorldError::RankOutOfRange {
            rank_var: "PMI_RANK",
            ..
        })
    ));
}

#[test]
fn mvapich() {
    let w = ok(&[
        ("MV2_COMM_WORLD_RANK", "2"),
        ("MV2_COMM_WORLD_SIZE", "4"),
        ("MV2_COMM_WORLD_LOCAL_RANK", "0"),
        ("MV2_COMM_WORLD_LOCAL_SIZE", "2"),
        ("PMI_RANK", "2"),
        ("PMI_SIZE", "4"),
    ]);
    assert_eq!(w.launcher, Launcher::Mvapich);
    assert_eq!((w.rank, w.local_world_size), (2, 2));
}

#[test]
fn plain_env() {
    let w = ok(&[
        ("RANK", "1"),
        ("WORLD_SIZE", "3"),
        ("MASTER_PORT", "40000"),
        ("AXSAVE_RUN_ID", "r1"),
    ]);
    assert_eq!(
        w,
        World {
            rank: 1,
            world_size: 3,
            local_rank: 1,
            local_world_size: 3,
            node_rank: Some(0),
            launcher: Launcher::Env,
            master_addr: Some("127.0.0.1".into()),
            master_port: 40000,
            run_id: Some("r1".into()),
            use_agent_store: false,
            restart_count: 0,
        }
    );
    let w = ok(&[
        ("RANK", "5"),
        ("WORLD_SIZE", "8"),
        ("LOCAL_RANK", "1"),
        ("LOCAL_WORLD_SIZE", "4"),
        ("NODE_RANK", "1"),
        ("MASTER_ADDR", "10.0.0.1"),
    ]);
    assert_eq!(
        (w.local_rank, w.node_rank, w.master_addr.as_deref()),
        (1, Some(1), Some("10.0.0.1"))
    );
    // Several nodes and no address: unknown rather than a wrong guess.
    let w = ok(&[
        ("RANK", "5"),
        ("WORLD_SIZE", "8"),
        ("LOCAL_RANK", "1"),
        ("LOCAL_WORLD_SIZE", "4"),
    ]);
    assert_eq!((w.master_addr, w.node_rank), (None, None));
    assert!(matches!(
        world(&[
            ("RANK", "5"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_WORLD_SIZE", "4")
        ]),
        Err(WorldError::Missing {
            var: "LOCAL_RANK",
            ..
        })
    ));
    assert!(matches!(
        world(&[("RANK", "0")]),
        Err(WorldError::Missing {
            var: "WORLD_SIZE",
            launcher: Launcher::Env,
            ..
        })
    ));
    assert!(matches!(
        world(&[("WORLD_SIZE", "2")]),
        Err(WorldError::Missing { var: "RANK", .. })
    ));
    assert!(matches!(
        world(&[("RANK", "2"), ("WORLD_SIZE", "2")]),
        Err(WorldError::RankOutOfRange { .. })
    ));
}

#[test]
fn slurm_step_beats_plain_env() {
    // RANK/WORLD_SIZE leaking into an srun step (e.g. exported by the batch script).
    let w = ok(&with(SLURM_STEP, &[("RANK", "0"), ("WORLD_SIZE", "1")]));
    assert_eq!(w.launcher, Launcher::Slurm);
    assert_eq!(w.rank, 6);
}

#[test]
fn empty_values_count_as_unset() {
    let w = ok(&[
        ("RANK", ""),
        ("WORLD_SIZE", ""),
        ("TORCHELASTIC_RUN_ID", ""),
    ]);
    assert_eq!(w.launcher, Launcher::Single);
}

#[test]
fn process_env_detects_something() {
    // Whatever runs the tests, detection must not fail on a normal environment.
    let w = detect_from_process_env();
    assert!(w.is_ok(), "{w:?}");
    if let Ok(w) = w {
        w.log_detected();
    }
}
