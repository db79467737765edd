"""Block states observed during a forward pass of the unpruned model: what Block Influence and angular
distance are computed from, without a pass of their own.

`BlockStates.observing(loaded, mask_of)` hooks every block while a pass runs (pruning.evaluate's
step-wide baseline pass installs it): per block, the sum over real tokens of 1 - cos(input, output)
and, for sequential pre-norm families, of each residual branch (attention: input vs input + attention
output; MLP: that vs the block output); and each row's last real token at every block boundary
(x_0 = the input of block 0, ..., x_L = the output of the last block) and after each attention branch.
`mask_of()` gives the current batch's (rows, width) attention mask (1 = a real token).
"""

from __future__ import annotations

import contextlib

import torch
from torch.nn import functional as F

from pruning.units import ATTENTION, BLOCK, MLP


def _first(value):
    return value[0] if isinstance(value, tuple) else value


class BlockStates:
    """Sums and last-token states of one or more observed passes (see the module docstring)."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.distance = {k: torch.zeros(num_blocks, dtype=torch.float64) for k in (BLOCK, ATTENTION, MLP)}
        self.tokens = 0
        self.sublayers = True  # whether branch values were observed (sequential pre-norm blocks)
        self.last: list[list[torch.Tensor]] = [[] for _ in range(num_blocks + 1)]  # x_l's last tokens, per batch
        self.last_mid: list[list[torch.Tensor]] = [[] for _ in range(num_blocks)]  # after attention, per batch

    @contextlib.contextmanager
    def observing(self, loaded, mask_of):
        """Hook every block of `loaded` while the body runs a pass of the unpruned model."""
        from pruning.families import FamilyError, branches_of

        try:
            branches = branches_of(loaded.model)
            paths = branches.attention if len(branches.attention) == 1 and len(branches.mlp) == 1 else None
        except FamilyError:
            paths = None
        parallel = getattr(loaded.model.config, "use_parallel_residual", False)
        post_norm = hasattr(loaded.blocks[0], "post_feedforward_layernorm")
        self.sublayers &= paths is not None and not parallel and not post_norm
        attention_out = {}
        handles = []
        for j, block in enumerate(loaded.blocks):
            handles.append(block.register_forward_hook(self._block_hook(j, mask_of, attention_out), with_kwargs=True))
            if self.sublayers:
                attention = block.get_submodule(paths[0])
                handles.append(attention.register_forward_hook(lambda m, a, out, j=j: attention_out.__setitem__(j, _first(out))))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _block_hook(self, j: int, mask_of, attention_out: dict):
        def hook(module, args, kwargs, output):
            x = (args[0] if args else kwargs["hidden_states"]).detach().float()
            out = _first(output).detach().float()
            mask = mask_of().to(x.device).bool()
            last = mask.shape[1] - 1 - mask.flip(1).int().argmax(1)  # each row's last real token
            rows = torch.arange(x.shape[0], device=x.device)
            if j == 0:
                self.last[0].append(x[rows, last].cpu())
                self.tokens += int(mask.sum())
            self.last[j + 1].append(out[rows, last].cpu())
            self.distance[BLOCK][j] += float((1 - F.cosine_similarity(x, out, dim=-1))[mask].sum())
            if self.sublayers:
                mid = x + attention_out.pop(j).detach().float()
                self.distance[ATTENTION][j] += float((1 - F.cosine_similarity(x, mid, dim=-1))[mask].sum())
                self.distance[MLP][j] += float((1 - F.cosine_similarity(mid, out, dim=-1))[mask].sum())
                self.last_mid[j].append(mid[rows, last].cpu())

        return hook

    def influence(self, kind: str = BLOCK) -> list[float]:
        """Mean over the observed tokens of 1 - cos(input, output) per block (or per branch)."""
        return (self.distance[kind] / max(self.tokens, 1)).tolist()

    def angular(self, start: list[torch.Tensor], end: list[torch.Tensor]) -> float:
        """Mean over rows of arccos(cos(a, b)) / pi between two boundaries' last tokens."""
        cos = F.cosine_similarity(torch.cat(start).double(), torch.cat(end).double(), dim=-1).clamp(-1, 1)
        return float((torch.arccos(cos) / torch.pi).mean())
