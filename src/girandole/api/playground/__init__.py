"""The server's own page: a playground at / and /playground (chat and raw completions, sampling
parameters, per-message stats, a token view, code snippets). Plain HTML, JS and CSS shipped in
this package; nothing is fetched at run time and nothing is built."""
