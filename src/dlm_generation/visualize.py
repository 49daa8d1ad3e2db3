"""See the decoding: which position was committed at which forward pass.

`diffusion_generate(..., output_commit_steps=True, return_dict_in_generate=True)` returns `commit_steps`, a
(batch, max_new_tokens) tensor with the forward pass after which each position stopped being a mask. This module
draws it:

- `plot_commit_trace({"vanilla": out_a, "threshold 0.9": out_b}, tokenizer, path="trace.png")`: one panel per
  configuration, positions across, rows down, colour = commit step, the decoded token written in each cell
  (needs matplotlib: `pip install "dlm-generation[bench]"`).
- `render_commit_trace(tokens, commit_steps, tokenizer)`: the same for a terminal, with 24-bit ANSI colours
  (`dlm-generate --trace` prints it).
- `commit_steps_from_history(history, ...)`: the same tensor from `output_history=True`'s canvases.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

__all__ = ["commit_steps_from_history", "plot_commit_trace", "render_commit_trace", "step_color", "token_labels",
           "trace_of"]

# Stops at 0, 0.5 and 1 of a dark-blue -> teal -> yellow ramp (close to viridis, readable on light and dark terminals).
_RAMP = ((68, 1, 84), (33, 145, 140), (253, 231, 37))


def step_color(step: int, last_step: int) -> tuple[int, int, int]:
    """RGB colour of commit step `step` (1..last_step) on the ramp early = dark blue, late = yellow."""
    if last_step <= 1:
        fraction = 0.0
    else:
        fraction = min(max((step - 1) / (last_step - 1), 0.0), 1.0)
    half = 0 if fraction <= 0.5 else 1
    local = fraction * 2 - half
    start, end = _RAMP[half], _RAMP[half + 1]
    return tuple(round(a + (b - a) * local) for a, b in zip(start, end))


def commit_steps_from_history(history: Sequence[torch.Tensor], max_new_tokens: int, mask_token_id: int) -> torch.Tensor:
    """(batch, max_new_tokens) commit steps from `output_history=True`'s canvases (one per forward pass)."""
    if not history:
        raise ValueError("history is empty: pass the `history` of a call made with output_history=True.")
    steps = torch.zeros(history[0].shape[0], max_new_tokens, dtype=torch.long)
    for index, canvas in enumerate(history, start=1):
        settled = canvas[:, -max_new_tokens:].cpu() != mask_token_id
        steps.masked_fill_(settled & (steps == 0), index)
    return steps


def trace_of(output) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, commit_steps) of the generated positions, from a `DiffusionGenerateOutput` or a (tokens, steps) pair.

    For a call made with `output_history=True` only, pass `(sequences[:, prompt_len:],
    commit_steps_from_history(history, max_new_tokens, mask_token_id))`.
    """
    if isinstance(output, (tuple, list)) and len(output) == 2:
        tokens, steps = (torch.as_tensor(part).cpu() for part in output)
    else:
        steps = getattr(output, "commit_steps", None)
        if steps is None:
            raise ValueError("the output has no commit trace: call diffusion_generate(..., return_dict_in_generate=True, "
                             "output_commit_steps=True), or pass a (tokens, commit_steps) pair.")
        steps = steps.cpu()
        tokens = output.sequences[:, -steps.shape[1]:].cpu()
    if tokens.dim() == 1:
        tokens, steps = tokens[None], steps[None]
    if tokens.shape != steps.shape:
        raise ValueError(f"tokens {tuple(tokens.shape)} and commit steps {tuple(steps.shape)} must have one shape.")
    return tokens, steps


def token_labels(tokenizer, ids: Sequence[int]) -> list[str]:
    """Short, printable cell labels: spaces shown as '␣', special tokens by a short name."""
    special = {}
    for name in ("eos_token", "pad_token", "mask_token", "bos_token"):
        token_id = getattr(tokenizer, f"{name}_id", None)
        if token_id is not None:
            special.setdefault(token_id, name.split("_")[0])
    labels = []
    for token_id in ids:
        if token_id in special:
            labels.append(special[token_id])
            continue
        text = tokenizer.decode([token_id])
        labels.append(text.replace(" ", "␣").replace("\n", "⏎") or "∅")
    return labels


def _shown_positions(tokens: torch.Tensor, stop_ids: set[int], extra: int = 4) -> int:
    """Positions up to each row's first stop token, plus `extra`, over all rows."""
    from .generation_utils import generated_lengths

    shown = int(generated_lengths(tokens, sorted(stop_ids) or None).max()) + extra
    return max(1, min(shown, tokens.shape[1]))


def _padding(tokens: torch.Tensor, tokenizer) -> torch.Tensor:
    """(batch, length) True at the padding after each row's first stop token (the stop itself stays visible, also
    when the pad id is the EOS id, as in LLaDA and Dream)."""
    pad = tokenizer.pad_token_id
    if pad is None:
        return torch.zeros_like(tokens, dtype=torch.bool)
    is_stop = torch.isin(tokens, torch.tensor(sorted(_stop_ids(tokenizer)), dtype=tokens.dtype))
    after_stop = (is_stop.long().cumsum(-1) - is_stop.long()) > 0
    return after_stop & (tokens == pad)


def _stop_ids(tokenizer) -> set[int]:
    return {i for i in (getattr(tokenizer, "eos_token_id", None), getattr(tokenizer, "pad_token_id", None))
            if i is not None}


def plot_commit_trace(panels: Mapping[str, object], tokenizer, path=None, max_positions: int | None = None,
                      rows: Sequence[int] | None = None, cell_width: float = 0.28,
                      title: str | None = None, block_length: int | None = None):
    """Draw one heat-map panel per configuration: positions across, batch rows down, colour = commit step.

    Args:
        panels: label -> a `DiffusionGenerateOutput` with `commit_steps`, or a (tokens, commit_steps) pair of
            (batch, max_new_tokens) tensors. Put the configurations you compare side by side here.
        tokenizer: decodes the cell labels.
        path: where to save the PNG (None: only return the figure).
        max_positions: columns drawn (default: up to the longest row's first EOS / pad, plus 4).
        rows: the batch rows to draw (default: all).
        cell_width: inches per position.
        title: the figure's title.
        block_length: draw a line at every block boundary.

    Returns the matplotlib `Figure`.
    """
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
        from matplotlib.colors import LinearSegmentedColormap
    except ImportError as error:
        raise ImportError("plot_commit_trace needs matplotlib: pip install 'dlm-generation[bench]'") from error
    if not panels:
        raise ValueError("panels is empty: pass {label: output} for at least one configuration.")
    if rows is not None and not len(rows):
        raise ValueError("rows is empty: pass the batch rows to draw (default: all).")
    traces, forwards = {}, {}
    for label, output in panels.items():
        tokens, steps = trace_of(output)
        nfe = getattr(output, "nfe", None)
        forwards[label] = f"{nfe} forward passes" if nfe else f"last commit step {max(int(steps.max()), 1)}"
        if rows is not None:
            bad = [r for r in rows if not 0 <= r < tokens.shape[0]]
            if bad:
                raise ValueError(f"rows {bad} are outside panel {label!r}'s batch of {tokens.shape[0]}.")
            tokens, steps = tokens[list(rows)], steps[list(rows)]
        traces[label] = (tokens, steps)
    stops = _stop_ids(tokenizer)
    width = max_positions or max(_shown_positions(t, stops) for t, _ in traces.values())
    width = min(width, max(t.shape[1] for t, _ in traces.values()))
    cmap = LinearSegmentedColormap.from_list("commit", [tuple(c / 255 for c in rgb) for rgb in _RAMP])
    heights = [t.shape[0] for t, _ in traces.values()]
    figure, axes = plt.subplots(len(traces), 1, squeeze=False,
                                figsize=(1.6 + cell_width * width, 0.9 + sum(0.34 * h + 0.55 for h in heights)),
                                gridspec_kw={"height_ratios": heights})
    for axis, (label, (tokens, steps)) in zip(axes[:, 0], traces.items()):
        last = max(int(steps.max()), 1)  # the colour scale covers the whole trace, drawn columns or not
        hidden = _padding(tokens, tokenizer)[:, :width]
        tokens, steps = tokens[:, :width], steps[:, :width]
        shown = steps.float().masked_fill((steps == 0) | hidden, float("nan"))
        image = axis.imshow(shown.numpy(), cmap=cmap, vmin=1, vmax=last, aspect="auto", interpolation="nearest")
        axis.set_facecolor("#e8e8e8")
        for r, row in enumerate(tokens.tolist()):
            for c, text in enumerate(token_labels(tokenizer, row)):
                if hidden[r, c]:
                    continue
                value = int(steps[r, c])
                dark = value and (value - 1) / max(last - 1, 1) < 0.55
                axis.text(c, r, text, ha="center", va="center", fontsize=6.5 if len(text) < 3 else 4.5,
                          color="white" if dark else "black")
        if block_length:
            for boundary in range(block_length, width, block_length):
                axis.axvline(boundary - 0.5, color="black", linewidth=1.2)
        axis.set_title(f"{label}: {forwards[label]}", fontsize=9, loc="left")
        axis.set_yticks(range(tokens.shape[0]))
        axis.set_yticklabels([f"row {r}" for r in (rows or range(tokens.shape[0]))], fontsize=7)
        ticks = list(range(0, width, 8))
        axis.set_xticks(ticks)
        axis.set_xticklabels([str(t) for t in ticks], fontsize=7)
        colorbar = figure.colorbar(image, ax=axis, fraction=0.025, pad=0.01)
        colorbar.set_label("commit step", fontsize=7)
        colorbar.ax.tick_params(labelsize=6)
    axes[-1, 0].set_xlabel("generated position (grey: padding after the stop)", fontsize=8)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    if path is not None:
        figure.savefig(path, dpi=150)
    return figure


def render_commit_trace(tokens: torch.Tensor, commit_steps: torch.Tensor, tokenizer, color: bool = True,
                        max_positions: int | None = None, mask_token_id: int | None = None) -> str:
    """A terminal picture of one trace: each token on a background coloured by its commit step.

    `tokens` / `commit_steps` are (batch, max_new_tokens) (or one row). With `color=False` the step numbers are
    printed under the tokens instead. Positions still masked (commit step 0) print as '·'; padding is left out.
    """
    tokens, steps = trace_of((tokens, commit_steps))
    if tokens.numel() == 0:
        return ""
    stops = _stop_ids(tokenizer)
    width = max_positions or _shown_positions(tokens, stops, extra=0)
    last = max(int(steps.max()), 1)
    hidden = _padding(tokens, tokenizer)[:, :width].tolist()
    lines = []
    for row, row_steps, row_hidden in zip(tokens[:, :width].tolist(), steps[:, :width].tolist(), hidden):
        labels = token_labels(tokenizer, row)
        cells, numbers = [], []
        for token_id, label, step, skip in zip(row, labels, row_steps, row_hidden):
            if skip and token_id != mask_token_id:
                continue
            if step == 0 or token_id == mask_token_id:
                label = "·"
            if color:
                r, g, b = step_color(step, last) if step else (90, 90, 90)
                ink = "97" if step and (step - 1) / max(last - 1, 1) < 0.55 else "30"
                cells.append(f"\033[48;2;{r};{g};{b}m\033[{ink}m{label}\033[0m")
            else:
                size = max(len(label), len(str(step)))
                cells.append(label.ljust(size))
                numbers.append(str(step).ljust(size))
        lines.append(("" if color else " ").join(cells))
        if not color:
            lines.append(" ".join(numbers))
    if color:
        legend = "".join(f"\033[48;2;{r};{g};{b}m \033[0m" for r, g, b in
                         (step_color(s, last) for s in range(1, last + 1, max(1, last // 24))))
        lines.append(f"commit step 1 {legend} {last}")
    return "\n".join(lines)
