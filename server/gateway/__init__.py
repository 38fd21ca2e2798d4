"""The HTTP/JSON shim: a client of TaskNodeService that answers legacy and REST callers.

app.py          the ASGI app: routing, the error boundary, responses
routes.py       path templates; the legacy routes and those of the google.api.http rules
requests.py     the request, and reading its query, body and ids
credentials.py  BlueKing credentials and the authentication seam
legacy.py       legacy parameters -> request message; NodeDetail -> the bk-sops envelope
canonical.py    grpc-gateway's mapping: query/path/body -> message; proto JSON out
statuses.py     the one table: gRPC code -> HTTP status; a Status's legacy code
client.py       the grpc.aio channel to the server
runner.py       uvicorn on a thread
examples.py     the curl commands printed at start-up and documented
"""
