"""gcp-storage-emulator with the one GCS precondition raypar relies on, as GCS documents it.

raypar's exclusive create on GCS (the lease, write-once records) is gcsfs's upload with
``ifGenerationMatch=0``: GCS answers ``412 Precondition Failed`` when the object exists, and
gcsfs raises FileExistsError. The emulator ignores preconditions (every upload succeeds), so a
lease race would have two winners there and the contract tests could not tell a raypar bug
from an emulator gap. This launcher adds that precondition to the emulator's upload handler,
as one check-and-write under a lock (whatever the server's threading), and nothing else: the
request must still carry ``ifGenerationMatch=0`` for an upload to be refused, so the tests
check that gcsfs sends it.

It also cancels a resumable upload session on ``DELETE`` of its URI, answering 499 as GCS does
(the emulator answers 501, which gcsfs retries for half a minute): raypar cancels the upload of
an output that fails.

And it takes concurrent connections: the emulator's server (http.server's, one request at a
time) listens with socketserver's backlog of 5, so the kernel dropped the 6th and later of a
burst of connections, and each such client waited for its SYN to be sent again (1 s, then 3 s):
raypar's concurrent reads of 40 small files took 9.4 s where one read takes 2 ms. A longer
backlog queues them instead; they are still served one at a time.

Usage: python gcs_emulator.py HOST PORT
"""

import sys
import threading
from http import HTTPStatus
from http.server import HTTPServer

from gcp_storage_emulator import server
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_uploads = threading.Lock()  # one upload at a time: the check and the write are one step
_insert = objects.insert


def _object_name(request):
    if "name" in request.query:
        return request.query["name"][0]
    data = request.data if isinstance(request.data, dict) else {}
    return (data.get("meta") or {}).get("name") or data.get("name")


def insert_unless_it_exists(request, response, storage, *args, **kwargs):
    with _uploads:
        if request.query.get("ifGenerationMatch") == ["0"]:
            try:
                storage.get_file_obj(request.params["bucket_name"], _object_name(request))
            except NotFound:
                pass
            else:
                response.status = HTTPStatus.PRECONDITION_FAILED
                return None
        return _insert(request, response, storage, *args, **kwargs)


objects.insert = insert_unless_it_exists  # server.py's fallback route looks it up at call time
for _, handlers in server.HANDLERS:
    for method, handler in list(handlers.items()):
        if handler is _insert:
            handlers[method] = insert_unless_it_exists



def cancel_upload(request, response, storage, *args, **kwargs):
    upload_id = request.query.get("upload_id", [None])[0]
    if upload_id is None:
        response.status = HTTPStatus.BAD_REQUEST
        return None
    try:
        storage.delete_resumable_file_obj(upload_id)
    except NotFound:
        response.status = HTTPStatus.NOT_FOUND
        return None
    response.status = 499  # "Client Closed Request": what GCS answers a canceled session
    return None


for _, handlers in server.HANDLERS:
    if handlers.get("PUT") is objects.upload_partial:  # the upload endpoint
        handlers["DELETE"] = cancel_upload

HTTPServer.request_queue_size = 1024  # the listen() backlog (socketserver's default is 5)

if __name__ == "__main__":
    host, port = sys.argv[1], int(sys.argv[2])
    emulator = server.create_server(host, port, in_memory=True)
    emulator.run()
