"""The restricted numbers of config fields: jsonargparse checks them when a config is parsed.

To mypy each is its base type; to jsonargparse, a type that refuses a value out of range with a
message naming the key. The two definitions live here, in a module that defines no config class,
because jsonargparse runs the ``TYPE_CHECKING`` blocks of a config class's module when it reads the
class's annotations: there ``Fraction = float`` would replace the checked type, and ``lora.dropout:
1.5`` would parse (tests/test_config_validation.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from jsonargparse.typing import restricted_number_type

if TYPE_CHECKING:
    Fraction = float
    SequenceLength = int
    LabelSmoothing = float
else:
    # A float in [0, 1).
    Fraction = restricted_number_type("Fraction", float, [(">=", 0.0), ("<", 1.0)])
    # Room for a prompt and a response.
    SequenceLength = restricted_number_type("SequenceLength", int, [(">=", 16)])
    # At 0.5 the labels carry no preference at all.
    LabelSmoothing = restricted_number_type("LabelSmoothing", float, [(">=", 0.0), ("<", 0.5)])
