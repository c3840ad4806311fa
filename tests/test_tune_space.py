"""The [tune] table of a preset: its search space, the defaults of every shipped method, bad input."""

from __future__ import annotations

import pytest

from vqabench.presets import load_presets, read_preset
from vqabench.spec import SpecError, TuneParam, spec_from_dict, tune_space


def test_a_tune_table_becomes_ranges_and_choices_in_its_order(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text(
        'method = "sft"\nepochs = 3\n[tune]\nobjective = "chosen_nll"\n'
        "lr = {low = 1e-5, high = 1e-3, log = true}\nepochs = {low = 1, high = 3}\n"
        "lr_decay = {choices = [0.8, 1.0]}\n"
    )
    space = tune_space(read_preset(path).spec)
    assert space.objective == "chosen_nll"
    assert space.params == (
        TuneParam("lr", 1e-5, 1e-3, log=True),
        TuneParam("epochs", 1, 3),
        TuneParam("lr_decay", choices=(0.8, 1.0)),
    )
    assert space.params[1].is_int and not space.params[0].is_int


def test_every_shipped_method_has_a_default_space():
    specs = {s.name: s for s in load_presets("all")}
    keys = {name: tune_space(spec).keys() for name, spec in specs.items()}
    assert keys["sft"] == ["lr", "epochs"]
    assert keys["dpo-beta0.1"] == ["lr", "beta", "epochs"]
    assert keys["ipo"] == ["lr", "beta", "epochs"]
    assert keys["orpo"] == ["lr", "lam", "epochs"]
    assert keys["simpo"] == ["lr", "beta", "simpo_gamma", "epochs"]
    assert keys["kto"] == ["lr", "beta", "kto_desirable_weight", "kto_undesirable_weight", "epochs"]
    sft = tune_space(specs["sft"])
    assert sft.params[0] == TuneParam("lr", pytest.approx(5e-6), pytest.approx(5e-4), log=True)
    assert sft.params[1] == TuneParam("epochs", 1, 3)
    # SFT's loss is comparable across its settings; a searched beta changes a DPO loss's scale
    assert sft.objective == "eval_loss" and tune_space(specs["dpo-beta0.1"]).objective == "chosen_nll"
    assert tune_space(specs["sft"].replace(epochs=1)).keys() == ["lr"]
    only_objective = tune_space(specs["orpo"].replace(tune={"objective": "eval_loss"}))
    assert only_objective.keys() == ["lr", "lam", "epochs"] and only_objective.objective == "eval_loss"


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ("tune = 3", "key 'tune' must be a table"),
        ("[tune]\nname = {choices = ['a']}", "key 'name' is not a setting tuning may search"),
        ("[tune]\nlr = 0.001", "key 'lr' has value 0.001, which must be a table like"),
        ("[tune]\nlr = {low = 1e-3, high = 1e-5}", "low must be below high"),
        ("[tune]\nlr = {low = 0.0, high = 1e-3, log = true}", "on a log scale, so low must be greater than 0"),
        ("[tune]\nlr = {low = 0.0, high = 1e-3}", "[tune]: key 'lr' has value 0.0; it must be greater than 0."),
        ("[tune]\nepochs = {low = 1.5, high = 3}", "key 'epochs' has bound 1.5, which must be an integer"),
        ("[tune]\nlr = {low = 1e-5, high = 1e-3, step = 2}", "must be a table like"),
        ("[tune]\nreference = {low = 1, high = 2}", "key 'reference' is not a number"),
        ("[tune]\nreference = {choices = ['copy', 'magic']}", "key 'reference' has value 'magic'; allowed values"),
        ("[tune]\nlr = {choices = []}", "must hold only a non-empty list 'choices'"),
        ("[tune]\nobjective = 'accuracy'", "key 'objective' has value 'accuracy'; allowed values are eval_loss"),
    ],
)
def test_a_bad_tune_table_is_one_sentence_naming_the_file_and_key(tmp_path, table, expected):
    path = tmp_path / "bad.toml"
    path.write_text(f'method = "sft"\n{table}\n')
    with pytest.raises(SpecError) as err:
        read_preset(path)
    message = str(err.value)
    assert expected in message and str(path) in message and "\n" not in message


def test_the_tune_table_survives_the_workers_json():
    spec = spec_from_dict({"name": "s", "method": "sft", "tune": {"lr": {"low": 1e-5, "high": 1e-3}}})
    again = spec_from_dict(spec.to_dict())
    assert again.tune == spec.tune and again.score_test is True
