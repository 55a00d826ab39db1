"""Automatic processing (DESIGN.md, `cases`): playbooks that turn findings into cases and
follow-up queries, the case view and graph, and notifications (the watch stream and the
node's webhooks).

- `playbooks`: playbook files, parsed strictly, their canonical bytes and digest;
- `runner`: running the registered playbooks of an agency, exactly once per finding and
  playbook version, across crashes (a spool of prepared envelopes);
- `view` and `graph`: what a case holds, as a timeline and as a graph of companies,
  persons and accounts;
- `events`: the events of a committed block (findings, case events, case steps), shared
  by `exchange watch` and the node's webhooks.
"""
