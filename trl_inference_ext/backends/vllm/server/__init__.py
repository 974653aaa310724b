"""`trl-inference serve`: the launcher (`launcher`), its API-key middleware (`auth`) and the worker extension that
receives pushed weights inside vLLM (`worker`).

`auth` and `worker` run inside the vLLM server's processes: they import only the standard library, torch and
`....errors`, never the rest of the package.
"""
