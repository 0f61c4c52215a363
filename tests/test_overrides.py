import math

import pytest

from entropy_lens.overrides import parse_set_items, parse_value, split_method_keys
from entropy_lens.train import build_config


def test_parse_value():
    assert parse_value("0.7") == 0.7 and parse_value("3") == 3 and parse_value("true") is True
    assert parse_value("None") is None and parse_value("exp") == "exp" and parse_value("inf") == math.inf


def test_parse_set_items_rejects_items_without_equals():
    assert parse_set_items(["steer.lambda_min=0.7", "optim.lr = 1e-4"]) == {"steer.lambda_min": "0.7", "optim.lr": "1e-4"}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_set_items(["steer.lambda_min"])


def test_split_method_keys_separates_methods_from_config():
    params, config = split_method_keys({"steer.lambda_min": "0.7", "optim.lr": "1e-4", "seed": "3"}, ["steer", "grpo"])
    assert params == {"steer": {"lambda_min": 0.7}}
    assert config == {"optim.lr": "1e-4", "seed": "3"}


def test_split_method_keys_refuses_a_method_not_run():
    with pytest.raises(ValueError, match="not being run"):
        split_method_keys({"steer.lambda_min": "0.7"}, ["grpo"])


def test_method_alias_only_for_a_run_with_its_own_method():
    params, _ = split_method_keys({"method.lambda_min": "0.6"}, ["steer"], own="steer")
    assert params == {"steer": {"lambda_min": 0.6}}
    _, config = split_method_keys({"method.lambda_min": "0.6"}, ["steer"])
    assert config == {"method.lambda_min": "0.6"}


def test_train_and_compare_share_the_grammar():
    a = build_config("arithmetic-tiny", "steer", ["steer.lambda_min=0.6"])
    b = build_config("arithmetic-tiny", "steer", ["method.lambda_min=0.6"])
    assert a.method_param_dict()["lambda_min"] == 0.6 == b.method_param_dict()["lambda_min"]
    with pytest.raises(ValueError, match="not being run"):
        build_config("arithmetic-tiny", "grpo", ["steer.lambda_min=0.6"])
