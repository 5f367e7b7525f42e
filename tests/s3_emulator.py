"""moto's S3 server with its conditional writes atomic, as S3's are.

raypar's exclusive create on S3 (the lease, write-once records) is s3fs's upload with
``If-None-Match: *``: S3 answers ``412 Precondition Failed`` when the object exists. moto
checks that header and then stores the object as two steps, on a server that serves requests
on several threads, so two uploads racing for one key can both succeed there: a lease race
would have two winners, and the contract tests could not tell a raypar bug from an emulator
gap. This launcher makes each object write one step (a lock around moto's PUT and POST object
handlers) and changes nothing else: a request must still carry the header to be refused.

Usage: python s3_emulator.py -H HOST -p PORT (moto.server's arguments)
"""

import functools
import sys
import threading

from moto import server
from moto.s3.responses import S3Response

_writes = threading.Lock()  # one object write at a time: the precondition and the write are one step


def _one_at_a_time(handler):
    @functools.wraps(handler)
    def locked(self, *args, **kwargs):
        with _writes:
            return handler(self, *args, **kwargs)
    return locked


S3Response.put_object = _one_at_a_time(S3Response.put_object)  # PUT: an upload, or a copy
S3Response._key_response_post = _one_at_a_time(S3Response._key_response_post)  # completing a multipart upload

if __name__ == "__main__":
    server.main(sys.argv[1:])
