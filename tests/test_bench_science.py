"""The science benches' bookkeeping (their training is what `driftsafe bench` runs)."""

import pytest

from bench import frontier, paper
from trainer.presets import apply_preset


def test_paper_rows_include_the_l2_anchor_and_the_presets_as_a_job_would_get_them():
    rows = {run: spec for run, _, spec, _ in paper.runs(seed=3, lora=True)}
    assert {"l2_anchor", "drift_safe_preset", "lora_drift_safe_preset"} <= rows.keys()
    assert rows["l2_anchor"] is None  # its strength comes from the self_distillation row
    for run, adapter in (("drift_safe_preset", "full"), ("lora_drift_safe_preset", "lora")):
        spec = rows[run]
        assert spec.preset == "drift_safe" and spec.adapter.type == adapter
        preset = apply_preset("drift_safe", None, adapter).self_distillation.hyperparameters
        hp = spec.method.self_distillation.hyperparameters
        for key in preset.model_fields_set:
            assert getattr(hp, key) == getattr(preset, key), key
        assert (hp.n_epochs, hp.batch_size) == (paper.EPOCHS, paper.BATCH)


def test_paper_table_prints_the_strata_and_drift_columns():
    row = {"run": "sft", "method": "supervised", "task_accuracy": 1.0, "new_fact_accuracy": 1.0,
           "base_heldout_known_accuracy": 0.99, "heldout_known_accuracy": 0.8,
           "forgetting": 0.19, "forgetting_seen_entities": 0.25,
           "forgetting_unseen_entities": 0.12, "representation_drift": 0.07}
    line = paper.format_table([row]).splitlines()[-1]
    assert "19.0 pts" in line and "25.0 / 12.0" in line and "7.0%" in line


def test_frontier_picks_the_least_forgetting_qualifying_checkpoint_and_the_first_one():
    points = [{"step": 10, "new_fact_accuracy": 0.5, "forgetting": 0.00},
              {"step": 20, "new_fact_accuracy": 0.96, "forgetting": 0.04},
              {"step": 30, "new_fact_accuracy": 1.0, "forgetting": 0.02},
              {"step": 40, "new_fact_accuracy": 1.0, "forgetting": 0.06}]
    best, early = frontier.choose(points, floor=0.95)
    assert best["step"] == 30 and early["step"] == 20
    assert frontier.choose(points[:1], floor=0.95) == (None, None)


def test_frontier_has_the_issue_s_configurations_and_two_levers_of_our_own():
    names = [name for name, _ in frontier.configurations(seed=0)]
    assert names[0] == "sft"
    for required in ("sd_lambda_0.5", "sd_lambda_1", "sd_lambda_2", "sd_lambda_4",
                     "sd_format_warmup", "sd_all_positions"):
        assert required in names
    assert {"sd_ramp", "sd_known_anchor"} <= set(names)
    assert all(spec.adapter.type == "lora" for _, spec in frontier.configurations(seed=0))


def test_interference_facts_are_new_people_with_the_asked_keys():
    from bench.interference import new_facts
    from trainer.world import WorldConfig, entity_of, generate_world

    world = generate_world(WorldConfig(seed=0))
    taken = {f.entity for f in world.known + world.train_new_names + world.train_new_uuids}
    names = set(world.first_names) | set(world.last_names)
    for kind in ("name", "uuid"):
        rows = new_facts(0, kind, 1200)
        assert len(rows) == 1200 and len({r["question"] for r in rows}) == 1200
        entities = {entity_of(r["question"]) for r in rows}
        assert not entities & taken
        tokens = {t for e in entities for t in e.split()}
        assert (tokens <= names) if kind == "name" else (tokens <= set(world.uuid_tokens))
        assert all(len(e.split()) == 2 for e in entities)
    assert new_facts(0, "name", 300) == new_facts(0, "name", 1200)[:300]


def test_paper_only_runs_the_named_rows_and_names_the_ones_it_has():
    chosen = paper.selected_runs(2, True, ["lora_drift_safe_preset", "l2_anchor"])
    named = [run for run, *_ in chosen]
    assert named == ["self_distillation", "l2_anchor", "lora_drift_safe_preset"]
    assert len(paper.selected_runs(2, False, None)) == len(paper.runs(2, False))
    with pytest.raises(SystemExit, match=r"no row \['lora_sft'\].*--lora adds"):
        paper.selected_runs(2, False, ["lora_sft"])
