"""The web console (``stratus serve console``): server-rendered pages over the
same commands and queries the CLI uses, with the browser's own token.

- ``app``: routes, middlewares (security headers, CSRF, sessions), templates
- ``pages``: one handler per page; ``live``: server-sent events
- ``topology``: the network drawn as SVG; ``timeline``: a server's history
- ``session``: cookies and CSRF; ``server``: running it
"""
