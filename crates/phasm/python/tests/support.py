"""What the host's tests share: a module of test actions, importable while a test case runs."""

from __future__ import annotations

import os
import sys
import tempfile
import unittest


class WithModule(unittest.TestCase):
    """A test case whose tests can import module ``MODULE_NAME``, whose source is
    ``MODULE_SOURCE`` (written to a temporary folder put first on ``sys.path``)."""

    MODULE_NAME = ""
    MODULE_SOURCE = ""
    tmp: tempfile.TemporaryDirectory[str]

    @classmethod
    def setUpClass(cls) -> None:
        cls.tmp = tempfile.TemporaryDirectory()
        with open(os.path.join(cls.tmp.name, f"{cls.MODULE_NAME}.py"), "w") as f:
            f.write(cls.MODULE_SOURCE)
        sys.path.insert(0, cls.tmp.name)

    @classmethod
    def tearDownClass(cls) -> None:
        sys.path.remove(cls.tmp.name)
        cls.tmp.cleanup()
