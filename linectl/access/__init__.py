"""Who may command the line: users and roles, sessions, device actors, directory login (21 CFR 11.10(d)(g), 11.300;
EU GMP Annex 11 §12).

Every command that reaches the line from outside the process carries an identity the channel verified:
MQTT a session token (or a one-shot credential), a PLC tag its configured device actor, an OPC UA method its
session user, the CLI offline the password of `--user`. The line checks the identity's permissions for the
command (`permissions.permits`) and records the verified name as the actor; a refusal is counted and audited in
aggregate (control.RefusalTally). Config: `access:` (settings.AccessConfig); users live in the store.
"""
