"""Train under ZeRO-3 with every weight partitioned and record where each layer's weights are during the
reversible backward: used by test_zero3_partitioned.py.

    torchrun --nproc_per_node 2 tests/zero3_partition_worker.py runs.json

runs.json holds a list of RunArgs keyword dicts; each rank writes <output_dir>/partition_rank<r>.json with:
  setup: parameter counts right after setup (before any step): how many elements this rank holds whole,
         its shards, the model's total, and whether every parameter is a ZeRO-3 parameter;
  backward_steps: per reversible layer visited in backward (step, layer): the ZeRO status of that layer's
         frozen weights on entry and once backward is done with the layer, and of the other MEFT layers'
         weights on entry;
  recompute: per frozen linear called inside the reversible backward: whether its weight was whole;
  gathers: DeepSpeed's all-gathers (step, phase forward/backward/reversible, demand or prefetch, layer);
  invalidated_traces: steps at which DeepSpeed's recorded module order (its prefetch plan) was discarded.
"""

import json
import sys
from pathlib import Path

import torch
from torch import nn

from meft_ds.reversible import MEFTStack
from meft_ds.training import RunArgs
from meft_ds.training.distributed import shutdown
from meft_ds.training.trainer import fit, setup


def _status(params) -> list[str]:
    return sorted({p.ds_status.name for p in params})


def record(args: RunArgs) -> dict:
    run = setup(args)
    engine, model = run.engine, run.engine.module
    params = list(model.parameters())
    report = {
        "setup": {
            "all_zero_params": all(hasattr(p, "ds_id") for p in params),
            "held_numel": sum(p.numel() for p in params),
            "shard_numel": sum(p.ds_tensor.numel() for p in params),
            "total_numel": sum(p.ds_numel for p in params),
        },
        "backward_steps": [], "recompute": [], "gathers": [], "invalidated_traces": [],
    }
    state = {"step": 1, "phase": "forward", "module": None}
    stack = next(m for m in model.modules() if isinstance(m, MEFTStack))
    layer_weights = [[p for p in layer.layer.parameters() if not p.requires_grad] for layer in stack.meft_layers]
    layer_of = {p.ds_id: i for i, weights in enumerate(layer_weights) for p in weights}

    for i, layer in enumerate(stack.meft_layers):
        def backward_step(*a, _i=i, _inner=layer.backward_step, **k):
            others = [p for j, weights in enumerate(layer_weights) if j != _i for p in weights]
            entry = {"step": state["step"], "layer": _i, "entry": _status(layer_weights[_i]),
                     "others_entry": _status(others)}
            state["phase"], state["entry"] = "reversible", entry
            return _inner(*a, **k)
        layer.backward_step = backward_step

        for module in layer.layer.modules():
            if isinstance(module, nn.Linear) and not module.weight.requires_grad:
                def pre_hook(module, _inputs, _i=i):
                    if state["phase"] == "reversible":  # runs after DeepSpeed's own pre-forward hook (the gather)
                        report["recompute"].append({"step": state["step"], "layer": _i,
                                                    "whole": module.weight.numel() == module.weight.ds_numel})
                module.register_forward_pre_hook(pre_hook)

    release = stack.after_layer_backward  # installed by setup for ZeRO-3

    def after_layer_backward(layer):
        release(layer)
        i = list(stack.meft_layers).index(layer)
        report["backward_steps"].append({**state.pop("entry"), "exit": _status(layer_weights[i])})
        state["phase"] = "backward"
    stack.after_layer_backward = after_layer_backward

    coordinator = engine.optimizer.parameter_offload.get_param_coordinator()
    fetch, gather = coordinator.fetch_sub_module, coordinator._PartitionedParameterCoordinator__all_gather_params
    invalidate = coordinator._invalidate_trace

    def fetch_sub_module(module, forward):
        state["module"] = {id(p) for p in module.parameters()}
        return fetch(module, forward)

    def all_gather_params(gathered, forward):
        kind = "demand" if all(id(p) in state["module"] for p in gathered) else "prefetch"
        layers = sorted({layer_of.get(p.ds_id, -1) for p in gathered})
        report["gathers"].append({"step": state["step"], "phase": state["phase"], "kind": kind, "layers": layers,
                                  "numel": sum(p.ds_numel for p in gathered)})
        return gather(gathered, forward)

    def invalidate_trace():
        report["invalidated_traces"].append(state["step"])
        return invalidate()

    coordinator.fetch_sub_module = fetch_sub_module
    coordinator._PartitionedParameterCoordinator__all_gather_params = all_gather_params
    coordinator._invalidate_trace = invalidate_trace
    step, backward = engine.step, engine.backward

    def engine_backward(*a, **k):
        state["phase"] = "backward"
        return backward(*a, **k)

    def engine_step(*a, **k):
        result = step(*a, **k)
        state["step"], state["phase"] = state["step"] + 1, "forward"
        return result

    engine.backward, engine.step = engine_backward, engine_step
    report["results"] = fit(run)
    return report


if __name__ == "__main__":
    for kwargs in json.loads(open(sys.argv[1]).read()):
        report = record(RunArgs(**kwargs))
        rank = torch.distributed.get_rank()
        (Path(kwargs["output_dir"]) / f"partition_rank{rank}.json").write_text(json.dumps(report, indent=1))
    shutdown()
