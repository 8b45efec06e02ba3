"""Trainable parameters (2·d·r per stream per block, 1/4 of PEFT LoRA on q,k,v,o), LoRA+ groups, training."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model

from core_models import DEPTH, HOSTS, host_registered, randomize_adapters, same_bits
from serial_lora_core import (
    SerialLoraConfig,
    SerialLoraError,
    count_trainable_parameters,
    inject_serial_lora,
    loraplus_param_groups,
    serial_lora_parameters,
)


@pytest.fixture(params=list(HOSTS))
def case(request):
    with host_registered(HOSTS[request.param]) as host_case:
        yield host_case


@pytest.mark.parametrize("rank", [1, 4, 8])
def test_trainable_parameters_are_2_d_r_per_stream_per_block(case, rank):
    model = case.model()
    total = sum(p.numel() for p in model.parameters())
    inject_serial_lora(model, SerialLoraConfig(rank=rank))
    expected = DEPTH * sum(2 * features * rank for _, features in case.streams.values())
    assert count_trainable_parameters(model) == expected
    assert sum(p.numel() for p in serial_lora_parameters(model)) == expected
    assert sum(p.numel() for p in model.parameters()) == total + expected
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in trainable if ".serial_lora.default." in n}


@pytest.mark.parametrize("rank", [2, 4, 8])
def test_quarter_of_peft_lora_on_q_k_v_o(rank):
    model = HOSTS["split"].model()
    peft_model = inject_adapter_in_model(
        LoraConfig(r=rank, lora_alpha=rank, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]), copy.deepcopy(model))
    peft_lora = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    assert peft_lora == count_trainable_parameters(peft_model)
    inject_serial_lora(model, SerialLoraConfig(rank=rank))
    ours = count_trainable_parameters(model)
    assert ours > 0
    assert 4 * ours == peft_lora


def _model_with_head(case):
    model = case.model()
    inject_serial_lora(model, SerialLoraConfig(rank=4))
    model.head.requires_grad_(True)  # a new task head trains alongside the adapters
    return model


def test_loraplus_groups(case):
    model = _model_with_head(case)
    groups = loraplus_param_groups(model, lr=1e-3, weight_decay=0.01)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"serial_lora_down", "serial_lora_up", "other"}
    assert by_name["serial_lora_up"]["lr"] == pytest.approx(20 * by_name["serial_lora_down"]["lr"])
    assert by_name["serial_lora_down"]["lr"] == by_name["other"]["lr"] == 1e-3
    assert all(g["weight_decay"] == 0.01 for g in groups)
    names = {id(p): n for n, p in model.named_parameters()}
    grouped = {g["name"]: [names[id(p)] for p in g["params"]] for g in groups}
    assert grouped["serial_lora_down"] and all(n.endswith(".down.weight") for n in grouped["serial_lora_down"])
    assert grouped["serial_lora_up"] and all(n.endswith(".up.weight") for n in grouped["serial_lora_up"])
    assert sorted(grouped["other"]) == ["head.bias", "head.weight"]
    everything = [n for g in grouped.values() for n in g]
    assert sorted(everything) == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert len(everything) == len(set(everything))
    custom = loraplus_param_groups(model, lr=2e-4, ratio=16)
    assert custom[1]["lr"] == pytest.approx(16 * 2e-4)


@pytest.mark.parametrize("lr, ratio", [(0.0, 20.0), (-1e-3, 20.0), (1e-3, 0.0)])
def test_loraplus_rejects_bad_values(lr, ratio):
    model = _model_with_head(HOSTS["fused"])
    with pytest.raises(SerialLoraError, match="lr and ratio"):
        loraplus_param_groups(model, lr=lr, ratio=ratio)


def test_loraplus_without_adapters_is_an_error():
    with pytest.raises(SerialLoraError, match="inject_serial_lora"):
        loraplus_param_groups(HOSTS["fused"].model(), lr=1e-3)


def test_optimizer_steps_change_only_adapters_and_head(case):
    model = _model_with_head(case)
    inputs = case.inputs()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(loraplus_param_groups(model, lr=1e-2), weight_decay=0.0)
    for step in range(2):
        optimizer.zero_grad()
        model(*inputs).square().mean().backward()
        optimizer.step()
        if step == 0:
            # B starts at zero, so A gets no gradient on the first step; B and the head move.
            for name, p in model.named_parameters():
                if name.endswith(".down.weight"):
                    assert torch.equal(p, before[name]), name
    for name, p in model.named_parameters():
        moved = not same_bits(p.detach(), before[name])
        should_move = ".serial_lora." in name or name.startswith("head.")
        assert moved == should_move, name


@pytest.mark.parametrize("host", ["fused", "split", "joint"])
def test_short_training_reduces_the_loss(host):
    case = HOSTS[host]
    torch.manual_seed(0)
    teacher = case.model()
    inject_serial_lora(teacher, SerialLoraConfig(rank=4))
    randomize_adapters(teacher, seed=10, std=0.3)
    student = case.model()
    frozen = {n: p.detach().clone() for n, p in student.named_parameters()}
    inject_serial_lora(student, SerialLoraConfig(rank=4, dropout=0.05))
    student.train()
    inputs = case.inputs("BHWC")
    with torch.no_grad():
        target = teacher(*inputs)
    optimizer = torch.optim.AdamW(loraplus_param_groups(student, lr=3e-3, ratio=4))
    losses = []
    for _ in range(25):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(student(*inputs), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    for name, p in student.named_parameters():
        if name in frozen:
            assert same_bits(p.detach(), frozen[name]), name
