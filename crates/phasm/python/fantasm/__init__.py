"""Fantasm's action API, running on phasm.

Fantasm applications' action modules import from here as they did on App Engine::

    from fantasm.action import FSMAction, ContinuationFSMAction
    from fantasm.constants import FORK_PARAM
    from fantasm.exceptions import HaltMachineError

The ``context`` an action receives behaves as Fantasm's ``FSMContext`` (a dict with
``fork``, ``spawn``, ``logger``, ``instanceName``, ``machineName``, ``currentState``, …).
What Fantasm did through App Engine services (datastore continuations, ``setQueue``,
``startStateMachine`` from outside an action) is explained where it is refused.
"""

__version__ = "2.0.0+phasm"
