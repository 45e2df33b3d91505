"""The ``tpru`` command (installed as ``tpru_agent.cli``): thin verbs over the SDK; cli/ is the only printer."""
