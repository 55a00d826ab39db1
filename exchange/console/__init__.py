"""`exchange console`: the analysts' web console, served on loopback by each person's own
process with their own keys (issue 21). `app` holds the routes, `session` what the person
reads and signs through their node, `security` the one-time token, session cookie, CSRF
and Content-Security-Policy, `i18n` the message catalogue (zh-CN by default, English)."""
