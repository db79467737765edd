"""Criterion `taylor`: block-level first-order Taylor importance, Shortened LLaMA's Taylor criterion
(Kim et al. 2024; Nota-NetsPresso/shortened-llm, src/anal_block_sensitivity_taylor.py): on the
calibration windows, each batch's mean next-token loss is back-propagated and the salience w * dL/dw
of every weight accumulated over the batches; a weight matrix scores sum |salience|, a block the sum
over its weight matrices (norm weights included, biases and embeddings not). Their "Taylor+" adds the
heuristic of keeping the first and last few blocks; here that is the procedure's `protect`, not the
score. Sublayers: the weights of the branch's modules (pruning.families). Ranked once.

Cost: one forward and one backward pass of the calibration text, about 3 forward-pass equivalents.
"""

from __future__ import annotations

from pruning.criteria import CriterionError, Inputs
from pruning.units import ATTENTION, BLOCK, MLP, Config, Unit

SEQ_LEN, NUM_SAMPLES, BATCH_SIZE = 128, 10, 10  # shortened-llm's defaults (max_seq_len, num_calib_data, batch_size)


def score(inputs: Inputs, removed: Config, units: Config, n: int = 1) -> dict[Unit, float]:
    """The Taylor score of each unit in the unpruned model (`removed` must be empty)."""
    if inputs.taylor is None:
        raise CriterionError(
            "criterion taylor needs calibration text: a perplexity task (e.g. wikitext) among the tasks; none given"
        )
    if removed:
        raise CriterionError("criterion taylor scores the unpruned model only; procedures allowed: one_shot, last_n")
    return {u: inputs.taylor[u] for u in units}


def unit_scores(loaded, text: str, seed: int = 0) -> dict[Unit, float]:
    """Taylor scores of every block and (where the family is known) every sublayer of `loaded`,
    from NUM_SAMPLES seeded windows of SEQ_LEN tokens of `text`."""
    from pruning.calibration import calibration_batches
    from pruning.families import FamilyError, branches_of

    model = loaded.model
    seq_len = min(SEQ_LEN, len(loaded.tokenizer(text, add_special_tokens=False)["input_ids"]) - 1)
    batches = calibration_batches(loaded.tokenizer, "", seq_len, NUM_SAMPLES, seed, BATCH_SIZE, text=text)
    weights = {name: p for name, p in model.named_parameters() if name.endswith("weight")}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
        for block in loaded.blocks:
            for name, p in block.named_parameters():
                p.requires_grad_(name.endswith("weight"))
        for batch in batches:
            batch = batch.to(loaded.device)
            model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
        salience = {
            id(p): float((p.detach().float() * p.grad.float()).abs().sum()) for p in weights.values() if p.grad is not None
        }
    finally:
        for p, flag in flags:
            p.grad = None
            p.requires_grad_(flag)
    try:
        branches = branches_of(model)
    except FamilyError:
        branches = None
    scores = {}
    for b, block in enumerate(loaded.blocks):
        scores[Unit(b, BLOCK)] = sum(salience.get(id(p), 0.0) for p in block.parameters())
        for kind in (ATTENTION, MLP) if branches else ():
            modules = [block.get_submodule(path) for path in branches.of(kind)]
            scores[Unit(b, kind)] = sum(salience.get(id(p), 0.0) for m in modules for p in m.parameters())
    return scores
