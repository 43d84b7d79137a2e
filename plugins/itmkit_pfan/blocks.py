"""PFAN's block layout: which cells of a grid x grid partition of the image each region covers.

The official repository ships the layout as ``{split}_boxes.npy`` (N_img, 36, 30) and contains
no script that made those files. The one place it computes a layout from raw boxes is the
Tencent-News server (``Tencent_PFAN/scan_server_whole.py``); this module follows that
computation, which agrees with every convention of the shipped files:

1. box corners are divided by the image width / height (values above 1 are clipped to 1);
2. the image is cut into ``grid`` x ``grid`` equal cells; cell (i_x, i_y) spans
   [i_x/g, (i_x+1)/g] x [i_y/g, (i_y+1)/g] and has index ``i_x * grid + i_y`` (x-major);
3. each cell the box overlaps (positive intersection area) is a candidate, weighted by the
   intersection area;
4. the ``top`` largest are kept, in decreasing order of area; missing slots get the padding
   index ``grid * grid`` (row 257 of PFAN's 257-row embedding) and weight 0;
5. the kept areas are divided by their sum, so a region's weights sum to 1.

Output: (..., 2 * top) float64, the ``top`` cell indices then their weights.

Where we differ, and why:

- Ties. Fully covered cells have exactly equal areas, so for a box covering more than ``top``
  cells entirely, which ones are kept depends on the sort. The official code takes the reverse
  of ``np.argsort`` (an unstable introsort, whose tie order depends on the list length and the
  NumPy build), which cannot be reproduced in general; we break ties by the lower cell index
  (stable descending sort). The weights are the same either way.
- Empty boxes (zero width or height, or entirely outside the image) make the official code
  divide by zero; we return the padding index with all weights 0.
- Negative coordinates (never produced by the BUTD detector) would give the official loop
  negative cell indices; we only count the part of the box inside the image.
- The server appends a 31st column (box area / image area) that the model never reads and the
  Flickr30K / COCO files do not have; we do not.
"""

from __future__ import annotations

import numpy as np
import torch


def boxes_to_blocks(boxes, image_size, grid: int = 16, top: int = 15):
    """PFAN block layout (..., 2*top) from xyxy pixel boxes (..., 4) and image sizes (..., 2) = width, height.

    ``image_size`` broadcasts against ``boxes[..., 0]``'s leading shape: (B, 2) sizes go with
    (B, R, 4) boxes. Accepts torch tensors or NumPy arrays and returns the same kind (float64).
    """
    if grid < 1 or not 1 <= top <= grid * grid:
        raise ValueError(f"need grid >= 1 and 1 <= top <= grid*grid, got grid={grid}, top={top}")
    as_numpy = isinstance(boxes, np.ndarray)
    boxes_t = torch.as_tensor(np.asarray(boxes) if as_numpy else boxes)
    sizes_t = torch.as_tensor(np.asarray(image_size) if isinstance(image_size, np.ndarray) else image_size)
    if boxes_t.shape[-1] != 4 or sizes_t.shape[-1] != 2:
        raise ValueError(
            f"boxes must be (..., 4) x1, y1, x2, y2 and image sizes (..., 2) width, height;"
            f" got {tuple(boxes_t.shape)} and {tuple(sizes_t.shape)}"
        )
    out = _blocks(boxes_t.to(torch.float64), sizes_t.to(boxes_t.device, torch.float64), grid, top)
    return out.cpu().numpy() if as_numpy else out


def _blocks(boxes: torch.Tensor, sizes: torch.Tensor, grid: int, top: int) -> torch.Tensor:
    lead = boxes.shape[:-1]  # (..., ) e.g. (B, R)
    while sizes.dim() - 1 < len(lead):  # (B, 2) -> (B, 1, 2) against (B, R)
        sizes = sizes.unsqueeze(-2)
    scale = torch.cat([sizes, sizes], dim=-1)  # (w, h, w, h)
    norm = (boxes / scale).clamp(max=1.0)  # (..., 4) in image fractions
    x1, y1, x2, y2 = norm.unbind(-1)
    edges = torch.arange(grid + 1, device=boxes.device, dtype=torch.float64) / grid  # exact multiples of 1/g
    lo, hi = edges[:-1], edges[1:]  # (g,)
    # Overlap of the box with each column / row of cells: (..., g)
    ox = (torch.minimum(x2[..., None], hi) - torch.maximum(x1[..., None], lo)).clamp(min=0)
    oy = (torch.minimum(y2[..., None], hi) - torch.maximum(y1[..., None], lo)).clamp(min=0)
    area = (ox[..., :, None] * oy[..., None, :]).flatten(-2)  # (..., g*g), index i_x*g + i_y
    kept, order = torch.sort(area, dim=-1, descending=True, stable=True)  # ties: lower index first
    kept, order = kept[..., :top], order[..., :top]
    present = kept > 0
    index = torch.where(present, order, torch.full_like(order, grid * grid))
    total = kept.sum(dim=-1, keepdim=True)
    weight = torch.where(present, kept / torch.where(total > 0, total, torch.ones_like(total)), torch.zeros_like(kept))
    return torch.cat([index.to(torch.float64), weight], dim=-1)  # (..., 2 * top)
