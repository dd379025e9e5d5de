"""The tissue gate: fg maps handed out by the chunk index are 0 off the tissue, and tile means follow."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from service.analysis.chunks import ChunkIndex, ChunkOutput, TissueGate, save_chunk


def _job(tmp_path: Path) -> Path:
    # two 40 x 40 l0 px tiles side by side, 4 x 4 cells of 10 px each, on a 70 px wide slide; a model that
    # calls every cell 0.5 (exact in the chunk files' float16), glass included
    fg = np.full((2, 4, 4), 0.5, np.float32)
    save_chunk(tmp_path, 0, ChunkOutput(np.full((2, 2), 0.5, np.float32), fg, tile_indices=np.array([0, 1])))
    return tmp_path


def _gate() -> TissueGate:
    mask = np.zeros((4, 8), bool)  # a mask pixel = 10 l0 px
    mask[:, :3] = True  # tissue: x < 30
    return TissueGate(mask, 10.0, np.array([[0, 0], [40, 0]]), 40.0, (70, 40))


def test_the_gate_zeroes_cells_off_the_tissue_and_means_count_cells_on_the_slide(tmp_path: Path) -> None:
    job = _job(tmp_path)
    raw, gated = ChunkIndex(job, 2, 2), ChunkIndex(job, 2, 2, gate=_gate())
    np.testing.assert_allclose(raw.fg_mean, [0.5, 0.5])
    _, maps = gated.load_fg(np.array([0, 1]))
    np.testing.assert_array_equal(maps[0][:, :3], np.float32(0.5))  # tissue
    np.testing.assert_array_equal(maps[0][:, 3], 0.0)  # glass inside the first tile
    np.testing.assert_array_equal(maps[1], 0.0)  # the second tile is all glass (and half off the slide)
    # tile 0: 12 of 16 cells on tissue; tile 1: none; its 4 x 3 cells on the slide are the denominator
    np.testing.assert_allclose(gated.fg_mean, [0.5 * 12 / 16, 0.0], rtol=1e-6)
    np.testing.assert_array_equal(_gate().cells_on_slide(np.array([0, 1]), 4), [16, 12])
    _, raw_maps = raw.load_fg(np.array([0, 1]))
    np.testing.assert_array_equal(raw_maps, np.float32(0.5))  # no gate: the model's own values
