"""Alarms (DESIGN.md §11): rules, their evaluation, and webhook notifications.

* :mod:`lars.alarms.rules`: what a rule says, read from and written to TOML/JSON (pure).
* :mod:`lars.alarms.evaluate`: what the rules see in the store's data, and the alarm
  state machine that turns it into stored states, history events and notifications (pure:
  no I/O, the clock passed in).
* :mod:`lars.alarms.notify`: the webhook POSTs (trio, one bounded queue per URL).
* :mod:`lars.alarms.engine`: the web role's task that runs the rounds under the store's
  lease.
"""
