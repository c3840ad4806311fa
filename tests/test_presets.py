"""Presets: the packaged files, validation messages, `after` resolution and run order."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib

from vqabench.presets import (
    PRESETS_DIR,
    Overrides,
    load_presets,
    order_runs,
    select_presets,
    top_level_presets,
)
from vqabench.spec import RunSpec, SpecError


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / f"{name}.toml"
    path.write_text(text)
    return path


def error_of(selection: str, overrides: Overrides | None = None) -> str:
    with pytest.raises(SpecError) as info:
        load_presets(selection, overrides)
    message = str(info.value)
    assert "\n" not in message and message.endswith("."), message  # one sentence
    return message


def test_all_is_every_top_level_preset_in_dependency_order():
    specs = load_presets("all")
    names = [s.name for s in specs]
    assert sorted(names) == ["dpo-beta0.1", "dpo-beta0.5", "ipo", "kto", "orpo", "sft", "simpo"]
    for dependant in ("dpo-beta0.1", "dpo-beta0.5", "ipo", "kto"):
        assert names.index("sft") < names.index(dependant)
    assert top_level_presets() == sorted(names)


def test_top_level_presets_share_the_training_setup_of_the_paper():
    specs = {s.name: s for s in load_presets("all")}
    shared = {
        (s.model, s.dataset.source, s.base_samples, s.epochs, s.limit, s.lr, s.batch_size, s.lr_decay, s.seed)
        for s in specs.values()
    }
    # one start for all (a base checkpoint weak enough for fine-tuning to move), 2,000 pairs
    assert shared == {("embedded", "easyvqa", 2000, 3, 2000, 5e-5, 16, 0.9, 0)}
    assert {s.judge.name for s in specs.values()} == {"auto"}
    assert {specs[n].after for n in ("ipo", "kto")} == {"sft"}
    assert specs["simpo"].after is None and specs["simpo"].resolved_beta == 2.0
    assert specs["dpo-beta0.1"].beta == 0.1 and specs["dpo-beta0.5"].beta == 0.5
    assert specs["dpo-beta0.1"].after == "sft"
    # every preference preset with a reference leaves its strategy to the worker (the cheapest exact one)
    assert {specs[n].reference for n in ("dpo-beta0.1", "dpo-beta0.5", "ipo", "kto")} == {"auto"}
    assert specs["orpo"].method == "orpo" and specs["orpo"].lam == 0.5 and specs["orpo"].after is None
    assert all(s.description for s in specs.values())


def test_paper_presets_use_blip_vqa_base_on_both_datasets():
    specs = load_presets("paper")
    assert len(specs) == 8
    for spec in specs:
        assert (spec.model, spec.epochs, spec.lr, spec.batch_size, spec.lr_decay) == (
            "Salesforce/blip-vqa-base",
            10,
            8e-6,
            16,
            0.9,
        )
        if spec.method == "dpo":
            assert spec.after == spec.name.rsplit("-dpo-beta", 1)[0] + "-sft"
            # the study's frozen copy, written in the file so that no default (auto elsewhere) changes it
            written = tomllib.loads((PRESETS_DIR / "paper" / f"{spec.name}.toml").read_text())
            assert written["reference"] == spec.reference == "copy"
    sources = {(s.dataset.source, s.dataset.schema) for s in specs}
    assert sources == {
        ("hf:alexshengzhili/mllm-dpo/dpo_inference0104.with_logpllava-v1.5-13b_2024-02-03.json", "llava"),
        ("hf:MMInstruction/VLFeedback/vlfeedback_80k.jsonl", "vlfeedback"),
    }
    assert {s.beta for s in specs if s.method == "dpo"} == {0.1, 0.5}


def test_lora_presets_share_one_setup_and_dpo_leaves_its_reference_to_auto():
    chosen = select_presets("lora")
    specs = {s.name: s for s in chosen.specs}
    assert sorted(specs) == ["lora-dpo", "lora-orpo", "lora-sft"] and chosen.added == []
    names = [s.name for s in chosen.specs]
    assert names.index("lora-sft") < names.index("lora-dpo")
    keys = ("model", "train", "lora_r", "lora_alpha", "lora_dropout", "lora_targets", "precision")
    keys += ("epochs", "limit", "lr", "batch_size", "lr_decay", "seed")
    shared = {repr([getattr(s, k) for k in keys]) for s in specs.values()}
    assert len(shared) == 1 and specs["lora-sft"].model == "embedded" and specs["lora-sft"].train == "lora"
    assert specs["lora-dpo"].after == "lora-sft" and specs["lora-dpo"].reference == "auto"
    assert {s.method for s in specs.values()} == {"sft", "dpo", "orpo"}
    # The folder is a group, like paper/: `all` stays the top-level presets; names and the folder work too.
    assert not {n for n in specs} & {s.name for s in load_presets("all")}
    assert [s.name for s in load_presets("lora-dpo")] == ["lora-sft", "lora-dpo"]
    assert sorted(s.name for s in load_presets(str(PRESETS_DIR / "lora"))) == sorted(specs)


def test_presets_live_inside_the_package_so_a_wheel_ships_them():
    import vqabench

    assert PRESETS_DIR.parent == Path(vqabench.__file__).parent
    assert (PRESETS_DIR / "sft.toml").is_file() and (PRESETS_DIR / "paper").is_dir()


def test_after_target_outside_the_selection_is_added_and_runs_first():
    chosen = select_presets("dpo-beta0.5")
    assert [s.name for s in chosen.specs] == ["sft", "dpo-beta0.5"]
    assert chosen.added == ["sft"]
    assert select_presets("sft,dpo-beta0.5").added == []


def test_overrides_apply_to_every_run():
    specs = load_presets("all", Overrides(epochs=1, limit=64, seed=7))
    assert {(s.epochs, s.limit, s.seed) for s in specs} == {(1, 64, 7)}


def test_a_file_selection_finds_its_after_target_beside_it(tmp_path):
    write(tmp_path, "base", 'method = "sft"\nepochs = 2\n')
    path = write(tmp_path, "pref", 'method = "dpo"\nafter = "base"\n')
    chosen = select_presets(str(path))
    assert [s.name for s in chosen.specs] == ["base", "pref"]
    assert chosen.added == ["base"] and chosen.specs[0].epochs == 2


def test_order_is_topological_and_stable_by_name():
    specs = [
        RunSpec(name="z", method="sft"),
        RunSpec(name="d", method="dpo", after="z"),
        RunSpec(name="a", method="sft"),
        RunSpec(name="c", method="dpo", after="d"),
        RunSpec(name="b", method="dpo", after="a"),
    ]
    assert [s.name for s in order_runs(specs)] == ["a", "b", "z", "d", "c"]
    assert [s.name for s in order_runs(reversed(specs))] == ["a", "b", "z", "d", "c"]


@pytest.mark.parametrize(
    "text, expected",
    [
        ('method = "sft"\nlearning_rate = 1e-4\n', "unknown key 'learning_rate'"),
        ('method = "sft"\nepochs = "three"\n', "key 'epochs' has value 'three', which must be an integer"),
        ('method = "ppo"\n', "key 'method' has value 'ppo'; allowed values are sft, dpo"),
        ('method = "sft"\nmodel = "blip tiny"\n', "key 'model' has value 'blip tiny'; allowed are embedded"),
        ('method = "sft"\ndataset = "vqa-v2"\n', "key 'dataset.source' has value 'vqa-v2'; allowed are 'easyvqa'"),
        ('method = "sft"\nepochs = 0\n', "key 'epochs' has value 0; it must be at least 1"),
        ('method = "dpo"\n', "method 'dpo' needs an SFT checkpoint"),
        ('method = "sft"\nepochs = 3\nepochs = 4\n', "not valid TOML"),
    ],
)
def test_a_bad_preset_is_one_sentence_naming_the_file_key_and_value(tmp_path, text, expected):
    path = write(tmp_path, "bad", text)
    message = error_of(str(path))
    assert str(path) in message and expected in message


def test_a_missing_after_target_names_the_key_and_the_choices(tmp_path):
    path = write(tmp_path, "pref", 'method = "dpo"\nafter = "sft-typo"\n')
    message = error_of(str(path))
    assert str(path) in message and "key 'after' has value 'sft-typo'" in message
    assert "sft" in message.split("allowed are")[1]


def test_a_dependency_cycle_is_refused(tmp_path):
    write(tmp_path, "one", 'method = "dpo"\nafter = "two"\n')
    write(tmp_path, "two", 'method = "dpo"\nafter = "one"\n')
    message = error_of(str(tmp_path))
    assert "cycle (one -> two -> one)" in message and "key 'after'" in message


def test_unknown_preset_names_and_missing_files_are_refused(tmp_path):
    message = error_of("sft,dpo-beta9")
    assert "'dpo-beta9'" in message and "orpo" in message
    message = error_of(str(tmp_path / "nope.toml"))
    assert "nope.toml does not exist" in message
    assert "holds no .toml file" in error_of(str(tmp_path))


def test_a_bad_override_is_refused_before_any_file_is_read():
    assert "--epochs has value 0; it must be at least 1" in error_of("all", Overrides(epochs=0))
    assert "--seed has value -1" in error_of("all", Overrides(seed=-1))


def test_two_files_with_one_run_name_are_refused(tmp_path):
    write(tmp_path, "a", 'name = "same"\nmethod = "sft"\n')
    write(tmp_path, "b", 'name = "same"\nmethod = "orpo"\n')
    assert "key 'name' has value 'same'" in error_of(str(tmp_path))


def test_set_overrides_any_key_and_is_validated_like_a_preset():
    specs = load_presets("sft", Overrides(settings=("dataset.test_size=64", "judge.name=exact", "lr=1e-3")))
    assert (specs[0].dataset.test_size, specs[0].judge.name, specs[0].lr) == (64, "exact", 1e-3)
    with pytest.raises(SpecError, match=r"unknown key 'dataset\.bogus'"):
        load_presets("sft", Overrides(settings=("dataset.bogus=1",)))
    with pytest.raises(SpecError, match="must be an integer"):
        load_presets("sft", Overrides(settings=("epochs=many",)))
    with pytest.raises(SpecError, match="KEY=VALUE"):
        load_presets("sft", Overrides(settings=("epochs",)))


def test_seeds_repeat_every_run_and_dependants_follow_their_own_seed():
    specs = load_presets("sft,dpo-beta0.1", Overrides(seeds=(0, 1)))
    by_name = {s.name: s for s in specs}
    assert set(by_name) == {"sft@s0", "sft@s1", "dpo-beta0.1@s0", "dpo-beta0.1@s1"}
    assert by_name["dpo-beta0.1@s1"].after == "sft@s1" and by_name["dpo-beta0.1@s1"].seed == 1
    names = [s.name for s in specs]
    assert names.index("sft@s1") < names.index("dpo-beta0.1@s1")
    with pytest.raises(SpecError, match="--seeds"):
        load_presets("sft", Overrides(seeds=()))


def test_set_is_checked_like_a_preset_file_before_anything_starts():
    with pytest.raises(SpecError, match=r"key 'model' has value '/nope/x'"):
        load_presets("sft", Overrides(settings=("model=/nope/x",)))
    with pytest.raises(SpecError, match=r"dataset\.source"):
        load_presets("sft", Overrides(settings=("dataset.source=missing.jsonl",)))
    with pytest.raises(SpecError, match=r"dataset\.eval_size"):
        load_presets("sft", Overrides(settings=("dataset.eval_size=0",)))


def test_a_model_folder_that_is_not_a_vlm_is_refused_before_anything_starts(tmp_path):
    folder = tmp_path / "encoder"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "bert", "hidden_size": 16}')
    path = write(tmp_path, "bad", f'method = "sft"\nmodel = "{folder}"\n')
    message = error_of(str(path))
    assert "model_type 'bert'" in message and "not a vision-language model" in message
    assert "qwen2_vl" in message.split("supported model types are")[1]
    empty = tmp_path / "empty"
    empty.mkdir()
    path = write(tmp_path, "bad", f'method = "sft"\nmodel = "{empty}"\n')
    assert "has no config.json" in error_of(str(path))
    (empty / "config.json").write_text("{not json")
    assert "cannot be read" in error_of(str(path))


def test_a_model_folder_of_a_supported_type_passes_the_check(tmp_path):
    folder = tmp_path / "qwen"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "qwen2_vl"}')
    path = write(tmp_path, "ok", f'method = "sft"\nmodel = "{folder}"\n')
    assert load_presets(str(path))[0].model == str(folder)


def _tiny_variants() -> list[tuple[str, str]]:
    """(family, variant) of every family's tiny built-in variant except BLIP's (the top-level presets')."""
    from vqabench.models.registry import variants

    found: dict[str, str] = {}
    for name, variant in variants().items():
        if not variant.real_size and variant.family != "blip":
            found.setdefault(variant.family, name)
    return sorted(found.items())


@pytest.mark.parametrize(("family", "variant"), _tiny_variants())
def test_every_family_has_an_sft_dpo_orpo_trio_on_its_tiny_variant(family, variant):
    from vqabench.presets import read_preset

    folder = PRESETS_DIR / "families"
    specs = {m: read_preset(folder / f"{family}-{m}.toml").spec for m in ("sft", "dpo", "orpo")}
    for method, spec in specs.items():
        assert spec.name == f"{family}-{method}" and spec.method == method
        assert (spec.model, spec.train, spec.epochs, spec.judge.name) == (variant, "lm", 1, "exact")
        assert spec.limit is not None and 100 <= spec.limit <= 1000
    assert specs["dpo"].after == f"{family}-sft" and specs["dpo"].reference == "auto"
    assert specs["sft"].after is None and specs["orpo"].after is None


def test_families_and_scale_are_groups_apart_from_all():
    assert not any(n.startswith(("qwen2-vl", "smolvlm")) for n in top_level_presets())
    chosen = select_presets("qwen2-vl-dpo,idefics3-orpo")
    assert [s.name for s in chosen.specs] == ["idefics3-orpo", "qwen2-vl-sft", "qwen2-vl-dpo"]
    assert chosen.added == ["qwen2-vl-sft"]
    # The folder's name selects all 21, each DPO after its SFT; a misspelling gets the sentence naming the groups.
    families = [s.name for s in load_presets("families")]
    assert len(families) == 21 and all(
        families.index(f"{n[:-4]}-sft") < families.index(n) for n in families if n.endswith("-dpo")
    )
    message = error_of("familes")
    assert message.startswith("--preset names 'familes', which is not a preset or a file;") and " families, " in message


def test_scale_presets_are_the_studys_eight_runs_on_two_hub_models():
    from vqabench.presets import read_preset

    paper = {p.stem: read_preset(p).spec for p in sorted((PRESETS_DIR / "paper").glob("*.toml"))}
    files = sorted((PRESETS_DIR / "scale").glob("*.toml"))
    specs = {p.stem: read_preset(p).spec for p in files}
    assert len(paper) == 8 and len(specs) == 16
    for prefix, hub, train in (
        ("qwen2-vl-2b", "Qwen/Qwen2-VL-2B-Instruct", "lora"),
        ("smolvlm-256m", "HuggingFaceTB/SmolVLM-256M-Instruct", "lm"),
    ):
        for name, study in paper.items():
            spec = specs[f"{prefix}-{name}"]
            assert (spec.model, spec.train) == (hub, train)
            assert (spec.method, spec.beta, spec.lam) == (study.method, study.beta, study.lam)
            assert (spec.epochs, spec.batch_size, spec.lr_decay) == (study.epochs, study.batch_size, study.lr_decay)
            assert spec.dataset == study.dataset
            assert spec.after == (f"{prefix}-{study.after}" if study.after else None)
            if spec.method == "dpo":
                assert spec.reference == "auto" and study.reference == "copy"  # the study keeps its copy
    order = [s.name for s in load_presets("scale")]
    assert sorted(order) == sorted(specs)
    assert all(order.index(specs[n].after) < order.index(n) for n in specs if specs[n].after)


def test_a_preset_without_a_train_line_gets_its_model_familys_default(tmp_path):
    """A causal VLM's is "lm", BLIP's stays "decoder"; a stated train is kept; a hub id whose config is not
    cached keeps "auto" for the worker to resolve on loading (prepare.load_model_and_data)."""
    folder = tmp_path / "smol"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "idefics3"}')
    presets = tmp_path / "presets"
    presets.mkdir()
    write(presets, "causal", 'method = "sft"\nmodel = "qwen2-vl-tiny-random"\n')
    write(presets, "blip", 'method = "sft"\n')  # the embedded model
    write(presets, "blipsized", 'method = "sft"\nmodel = "blip-vqa-base-random"\n')
    write(presets, "local", f'method = "sft"\nmodel = "{folder}"\n')
    write(presets, "stated", 'method = "sft"\nmodel = "qwen2-vl-tiny-random"\ntrain = "lora"\n')
    write(presets, "hub", 'method = "sft"\nmodel = "nobody-here/never-downloaded-vl"\n')
    trains = {s.name: s.train for s in load_presets(str(presets))}
    assert trains == {
        "causal": "lm",
        "blip": "decoder",
        "blipsized": "decoder",
        "local": "lm",
        "stated": "lora",
        "hub": "auto",
    }
    # --set model= on a preset without a train line: the new model's default, unless --set names train too.
    blip = str(presets / "blip.toml")
    assert load_presets(blip, Overrides(settings=("model=qwen2-vl-tiny-random",)))[0].train == "lm"
    assert load_presets(blip, Overrides(settings=("model=qwen2-vl-tiny-random", "train=lora")))[0].train == "lora"
    stated = str(presets / "stated.toml")
    assert load_presets(stated, Overrides(settings=("model=llava-tiny-random",)))[0].train == "lora"


def test_every_packaged_preset_resolves_its_train_before_anything_runs():
    from vqabench.presets import packaged_presets, read_preset

    trains = {name: read_preset(path).spec.train for name, path in packaged_presets().items()}
    assert "auto" not in trains.values()
    assert {trains[name] for name in top_level_presets()} == {"decoder"}  # BLIP's runs, specs and keys unchanged
