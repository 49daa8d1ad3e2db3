"""Streamers for diffusion decoding.

`diffusion_generate(..., streamer=...)` follows transformers' streamer protocol: `put(prompt)`, then after every
forward `put` of each newly settled run of tokens (the tokens before the first mask, batch size 1 only), then
`put_draft(draft)` when the streamer has that method: the canvas after the settled text, masks included (a streamer
whose `supports_batch` is True gets the whole generated canvas of every row), and finally `end()`.

Which streamer for what:

- `transformers.TextStreamer` / `TextIteratorStreamer`: print or iterate the settled text; one row.
- `transformers.TextDiffusionStreamer`: also shows the current draft (masks included) in the terminal, overwriting
  it at every step; one row.
- `CanvasStreamer` (here): every row of a batch, as `CanvasFrame`s (tokens, per-position commit step, elapsed time)
  from an iterator that another thread reads: what a UI needs to draw the canvas as it fills in.
"""

from __future__ import annotations

import queue
import time
from dataclasses import dataclass

import torch
from transformers.generation.streamers import BaseStreamer

__all__ = ["CanvasFrame", "CanvasStreamer"]


@dataclass
class CanvasFrame:
    """The generated canvas after one forward pass.

    Attributes:
        step: forward passes so far (1-based, counted like `nfe`).
        tokens: (batch, max_new_tokens) token ids; masked positions hold the mask id.
        commit_steps: (batch, max_new_tokens) int64, the step at which each position stopped being a mask (0 while it
            still is one), as `diffusion_generate(output_commit_steps=True)` returns it at the end.
        seconds: wall-clock time since the prompt was put.
    """

    step: int
    tokens: torch.LongTensor
    commit_steps: torch.LongTensor
    seconds: float

    def masked(self, mask_token_id: int) -> torch.BoolTensor:
        return self.tokens == mask_token_id


class _Finished:
    """Queue marker: decoding ended (with an error when `error` is set)."""

    def __init__(self, error: BaseException | None = None):
        self.error = error


class CanvasStreamer(BaseStreamer):
    """Collects the canvas after every forward, for every row, and hands it to a reader thread.

    Run `diffusion_generate` in one thread and iterate the streamer in another; the iteration yields a `CanvasFrame`
    per forward and stops when decoding ends. If the generating thread fails, call `close(error)` and the reader
    gets that error instead of waiting forever; `timeout` (seconds) bounds each wait as well.

    ```python
    streamer = CanvasStreamer(mask_token_id=model.config.mask_token_id)
    thread = threading.Thread(target=run_and_close, args=(streamer,))  # calls model.diffusion_generate(...)
    thread.start()
    for frame in streamer:
        draw(frame.tokens, frame.commit_steps)
    ```

    `keep_frames=True` also keeps every frame in `frames` (a full replay, like `output_history`).
    """

    supports_batch = True

    def __init__(self, mask_token_id: int, timeout: float | None = None, keep_frames: bool = False):
        if not isinstance(mask_token_id, int) or isinstance(mask_token_id, bool) or mask_token_id < 0:
            raise ValueError(f"mask_token_id must be a non-negative token id, got {mask_token_id!r}; pass "
                             "model.config.mask_token_id.")
        self.mask_token_id = mask_token_id
        self.timeout = timeout
        self.keep_frames = keep_frames
        self.frames: list[CanvasFrame] = []
        self.prompt: torch.LongTensor | None = None
        self._queue: queue.Queue = queue.Queue()
        self._commit_steps: torch.LongTensor | None = None
        self._step = 0
        self._began = 0.0
        self._closed = False

    # -- the generating side (transformers' protocol)
    def put(self, value: torch.LongTensor) -> None:
        """The first call carries the prompt; later calls (settled runs of a batch of one) are already in drafts.
        A streamer passed to a new call after its previous one ended starts afresh (its old frames are dropped)."""
        if self._closed:
            self.__init__(self.mask_token_id, self.timeout, self.keep_frames)
        if self.prompt is None:
            self.prompt = value if value.dim() == 2 else value[None]
            self._began = time.perf_counter()

    def put_draft(self, value: torch.LongTensor, **_) -> None:
        tokens = value if value.dim() == 2 else value[None]
        self._step += 1
        settled = tokens != self.mask_token_id
        if self._commit_steps is None or self._commit_steps.shape != tokens.shape:
            self._commit_steps = torch.zeros(tokens.shape, dtype=torch.long)
        self._commit_steps.masked_fill_(settled & (self._commit_steps == 0), self._step)
        frame = CanvasFrame(self._step, tokens.clone(), self._commit_steps.clone(), time.perf_counter() - self._began)
        if self.keep_frames:
            self.frames.append(frame)
        self._queue.put(frame)

    def end(self) -> None:
        self.close()

    def close(self, error: BaseException | None = None) -> None:
        """Stop the reader's iteration; with `error`, the reader raises it. Calling it again does nothing."""
        if not self._closed:
            self._closed = True
            self._queue.put(_Finished(error))

    # -- the reading side
    def __iter__(self):
        return self

    def __next__(self) -> CanvasFrame:
        frame = self.get(self.timeout)
        if frame is None:
            raise TimeoutError(f"no canvas frame within {self.timeout} s: is diffusion_generate running with "
                               "streamer=this streamer, and does its thread call close(error) when it fails?")
        return frame

    def get(self, timeout: float | None = 0.0) -> CanvasFrame | None:
        """The next frame, or None if none arrives within `timeout` seconds (0: do not wait; None: wait as long as it
        takes). Raises StopIteration once decoding has ended, or the error given to `close`."""
        try:
            item = self._queue.get(block=timeout is None or timeout > 0, timeout=timeout or None)
        except queue.Empty:
            return None
        if isinstance(item, _Finished):
            self._queue.put(item)  # later reads stop too
            if item.error is not None:
                raise item.error
            raise StopIteration
        return item
