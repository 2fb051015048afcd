"""Fold placement on GPUs and concurrency limits (pure functions; Ray is imported but not started)."""

import pytest

from orchestrator.cluster.schedule import ClusterError, plan_concurrency, plan_phases
from trainer_core.config import Config


@pytest.mark.parametrize("n_folds, gpus, per_fold, pack, expected", [
    (5, 4, 1, True, [([0, 1, 2, 3], 1), ([4], 4)]),          # not a wave of four then a lone fold on one GPU
    (5, 4, 1, False, [([0, 1, 2, 3, 4], 1)]),
    (5, 2, 1, True, [([0, 1, 2, 3], 1), ([4], 2)]),
    (4, 4, 1, True, [([0, 1, 2, 3], 1)]),                    # no remainder: nothing to pack
    (2, 4, 1, True, [([0, 1], 2)]),                          # fewer folds than GPUs: each fold gets two
    (5, 8, 2, True, [([0, 1, 2, 3], 2), ([4], 8)]),
    (6, 4, 1, True, [([0, 1, 2, 3], 1), ([4, 5], 2)]),
    (5, 0, 0, True, [([0, 1, 2, 3, 4], 0)]),                 # CPU folds
])
def test_plan_phases(n_folds, gpus, per_fold, pack, expected):
    plan = plan_phases(list(range(n_folds)), gpus, per_fold, pack)
    assert plan == expected
    assert sorted(f for fs, _ in plan for f in fs) == list(range(n_folds))  # every fold exactly once
    assert all(len(fs) * g <= max(gpus, per_fold) for fs, g in plan[1:])  # a packed phase never oversubscribes


def test_concurrency_is_bounded_by_gpus_cpus_and_config():
    cfg = Config()
    cfg.cluster.gpus_per_fold, cfg.cluster.cpus_per_worker = 1, 4
    assert plan_concurrency(cfg, {"GPU": 4, "CPU": 64}, 5) == 4
    assert plan_concurrency(cfg, {"GPU": 4, "CPU": 8}, 5) == 2       # CPUs run out first
    cfg.cluster.max_concurrent_folds = 1
    assert plan_concurrency(cfg, {"GPU": 4, "CPU": 64}, 5) == 1
    with pytest.raises(ClusterError, match="has 0 GPU"):
        plan_concurrency(cfg, {"CPU": 2}, 5)
    cpu = Config()
    assert plan_concurrency(cpu, {"CPU": 2}, 5) == 2
    cpu.cluster.cpus_per_worker = 3
    with pytest.raises(ClusterError, match="needs 3 CPUs"):
        plan_concurrency(cpu, {"CPU": 2}, 5)


def test_cpu_folds_pack_the_last_wave_onto_more_threads():
    from orchestrator.cluster.schedule import plan_fold_phases

    cfg = Config()  # CPU folds, 1 worker x 1 CPU
    before = cfg.to_dict()
    phases = plan_fold_phases(cfg, [0, 1, 2, 3, 4], {"CPU": 2})
    assert [(list(ph), {p.cpus_per_worker for p in ph.values()}) for ph in phases] == [([0, 1, 2, 3], {1.0}),
                                                                                         ([4], {2.0})]
    assert cfg.to_dict() == before  # placement travels beside the config, which is never rewritten
    gpu = Config()
    gpu.cluster.gpus_per_fold = 1
    phases = plan_fold_phases(gpu, [0, 1, 2, 3, 4], {"CPU": 64, "GPU": 4})
    assert [(list(ph), {p.gpus for p in ph.values()}) for ph in phases] == [([0, 1, 2, 3], {1}), ([4], {4})]
    assert plan_concurrency(gpu, {"CPU": 64, "GPU": 4}, 1, phases[1][4]) == 1  # the packed fold holds all four GPUs


def test_placement_is_frozen_and_follows_the_config():
    import dataclasses

    from orchestrator.cluster.schedule import Placement, base_placement

    cfg = Config()
    cfg.cluster.cpu_workers_per_fold, cfg.cluster.cpus_per_worker = 2, 1.5
    p = base_placement(cfg)
    assert p == Placement(gpus=0, cpu_workers=2, cpus_per_worker=1.5) and p.workers == 2 and p.cpus == 3.0
    assert not p.use_gpu and p.stop_at is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.gpus = 4


@pytest.mark.parametrize("n_folds,slots", [(5, 4), (5, 2), (5, 3), (7, 4), (3, 2)])
def test_rotation_keeps_every_slot_busy_and_runs_each_fold_once_in_order(n_folds, slots):
    from orchestrator.cluster.schedule import plan_rotation

    folds = list(range(10, 10 + n_folds))
    phases = plan_rotation(folds, slots)
    assert len(phases) == n_folds  # each phase is 1/slots of a fold-time: n_folds/slots fold-times in all
    seen = {f: [] for f in folds}
    for members, stops in phases:
        assert len(members) == slots == len(set(members)) and set(stops) == set(members)  # every slot busy
        for f in members:
            seen[f].append(stops[f])
    for f, pieces in seen.items():  # slots pieces per fold, each ending further on, the last one to the end
        assert pieces == [i / slots for i in range(1, slots)] + [None], (f, pieces)


def test_rotation_is_only_used_when_folds_do_not_divide_evenly():
    from orchestrator.cluster.schedule import base_placement, plan_fold_phases, plan_rotation

    assert plan_rotation([0, 1, 2, 3], 2) == [([0, 1, 2, 3], {})]
    assert plan_rotation([0, 1], 4) == [([0, 1], {})]
    gpu = Config()
    gpu.cluster.gpus_per_fold, gpu.cluster.rotate_folds = 1, True
    phases = plan_fold_phases(gpu, [0, 1, 2, 3, 4], {"CPU": 64, "GPU": 4})
    assert len(phases) == 5 and all(len(ph) == 4 and {p.gpus for p in ph.values()} == {1} for ph in phases)
    # each fold's pieces stop where plan_rotation says
    assert [{f: p.stop_at for f, p in ph.items()} for ph in phases] == [s for _, s in plan_rotation(list(range(5)), 4)]
    assert plan_fold_phases(gpu, [0, 1, 2, 3], {"CPU": 64, "GPU": 4}) == [dict.fromkeys(range(4), base_placement(gpu))]


def test_rotation_pays_only_past_the_crossover_computed_from_overheads():
    from orchestrator.cluster.schedule import prefer_rotation, rotation_crossover_s, schedule_seconds

    # five folds on four GPUs, 100 s of overhead per phase or piece, data-parallel 1.1x faster over four GPUs
    # packed: 2 phases, 1 + 1/1.1 fold-times; rotated: 5 pieces, 1.25 fold-times; rotation's 300 s of extra
    # overhead pays once a fold-time is long enough
    cross = rotation_crossover_s(5, 4, 100.0, 100.0, 1.1)
    packed, rotated = schedule_seconds(5, 4, cross, 100.0, 100.0, 1.1)
    assert packed == pytest.approx(rotated)  # the crossover is where both take the same wall time
    packed, rotated = schedule_seconds(5, 4, 0.9 * cross, 100.0, 100.0, 1.1)
    assert packed < rotated  # shorter folds: packing wins
    packed, rotated = schedule_seconds(5, 4, 1.1 * cross, 100.0, 100.0, 1.1)
    assert rotated < packed  # longer folds: rotation wins
    assert not prefer_rotation(5, 4, 0.9 * cross, 100.0, 100.0, 1.1)
    assert prefer_rotation(5, 4, 1.1 * cross, 100.0, 100.0, 1.1)
    assert rotation_crossover_s(4, 4, 100.0, 100.0, 1.1) is None        # folds divide evenly: nothing to rotate
    assert rotation_crossover_s(5, 4, 100.0, 100.0, 4.0) is None        # perfect data-parallel scaling: never
    assert not prefer_rotation(5, 4, 1e9, 100.0, 100.0, 4.0)
    assert rotation_crossover_s(3, 2, 50.0, 10.0, 1.0) == 0.0            # cheaper pieces than phases: always


def test_rotate_folds_null_rotates_gpu_folds_only_past_the_measured_crossover():
    from orchestrator.cluster.schedule import plan_fold_phases, rotation_is_faster

    gpu = Config()
    gpu.cluster.gpus_per_fold = 1
    assert gpu.cluster.rotate_folds is None  # the default: chosen from the fold's length
    resources = {"CPU": 64, "GPU": 4}
    # the bundled 2,000-row sample: 1,600 training rows a fold, 400 steps (~93 s): packing
    assert not rotation_is_faster(gpu, 5, 4, 1_600)
    assert [list(ph) for ph in plan_fold_phases(gpu, [0, 1, 2, 3, 4], resources, 1_600)] == [[0, 1, 2, 3], [4]]
    # the Kaggle training set: ~46,000 training rows a fold (~45 minutes): rotation, five phases of four pieces
    assert rotation_is_faster(gpu, 5, 4, 46_000)
    phases = plan_fold_phases(gpu, [0, 1, 2, 3, 4], resources, 46_000)
    assert len(phases) == 5 and all(len(ph) == 4 for ph in phases)
    assert not rotation_is_faster(gpu, 4, 4, 46_000)  # folds divide evenly
    # two GPUs: the packed fold's 2-row halves scale 1.68x, so rotation only pays on long folds (~1,500 s training)
    assert not rotation_is_faster(gpu, 3, 2, 240)  # the measured case (3 folds of 240 rows): packing won, 125 vs 200 s
    assert not rotation_is_faster(gpu, 5, 2, 20_000)
    assert rotation_is_faster(gpu, 5, 2, 46_000)
    gpu.cluster.rotate_folds = False  # an explicit choice wins
    assert len(plan_fold_phases(gpu, [0, 1, 2, 3, 4], resources, 46_000)) == 2
    cpu = Config()  # CPU folds never rotate unless asked
    assert len(plan_fold_phases(cpu, [0, 1, 2, 3, 4], {"CPU": 2}, 46_000)) == 2


def test_the_rotation_decision_reads_the_measured_overheads_file(monkeypatch, tmp_path):
    """The figures come from orchestrator/cluster/overheads.yaml, each with the card and the write-up that measured
    it; a changed value there changes the decision."""
    import yaml

    from orchestrator.cluster import schedule

    data = yaml.safe_load(schedule.OVERHEADS_FILE.read_text())
    for name, entry in data.items():
        assert entry["card"] and "NVIDIA" in entry["card"] and entry["source"].startswith("docs/"), name
    gpu = Config()
    gpu.cluster.gpus_per_fold = 1
    assert schedule.rotation_is_faster(gpu, 5, 4, 46_000)  # the shipped figures: a Kaggle-sized fold rotates
    data["piece_overhead_s"]["value"] = 5_000.0  # pieces that cost more than they save
    edited = tmp_path / "overheads.yaml"
    edited.write_text(yaml.safe_dump(data))
    monkeypatch.setattr(schedule, "OVERHEADS_FILE", edited)
    assert not schedule.rotation_is_faster(gpu, 5, 4, 46_000)
    del data["step_s"]
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match="broken.yaml: no value for step_s"):
        schedule.load_overheads(broken)
