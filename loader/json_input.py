"""JSON from files users give (adapter configs, safetensors headers, the state file, training data, jobs)."""
from __future__ import annotations

import json


def loads(text: str | bytes) -> object:
    """json.loads, where a document nested too deeply, or an integer of over 4300 digits, is a JSONDecodeError like
    any other bad JSON: json.loads raises RecursionError and ValueError for them, which no caller expects (an
    adapter config of 200k '[' was INTERNAL, a state file of them stopped the start with a traceback)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply", "", 0) from None
    except json.JSONDecodeError:
        raise
    except ValueError as exc:  # an integer of more digits than int() converts (sys.get_int_max_str_digits)
        raise json.JSONDecodeError(str(exc), "", 0) from None
