"""A GCS API on 127.0.0.1 that every storage layer of ddep can be pointed at.

Four clients talk to GCS, each with its own client:

* TensorStore (orbax's arrays) takes an endpoint: `TENSORSTORE_GCS_HTTP_URL`.
* TensorFlow's GCS filesystem (clu's summary writer, `tf.io.gfile`, and
  etils.epath's `gs://` backend when TF is installed) has its endpoints
  hard-coded to https://www.googleapis.com and https://storage.googleapis.com.
  It does honour libcurl's `https_proxy` and `CURL_CA_BUNDLE`, so the proxy
  below answers CONNECT for those hosts, terminates TLS with a certificate
  from a throw-away CA, and relays the plain HTTP to the emulator.
* google-cloud-storage (orbax asks it about the bucket) takes
  `STORAGE_EMULATOR_HOST`.
* TensorStore and TF take `GOOGLE_AUTH_TOKEN_FOR_TESTING` instead of real
  credentials; google-cloud-storage needs none with an emulator.

The emulator is the `gcp-storage-emulator` package (a test dependency),
in memory, with one bucket. `GcsEmulator.env` is what a child process needs.
"""

from __future__ import annotations

import json
import os
import select
import socket
import socketserver
import ssl
import subprocess
import threading
import urllib.request

GOOGLE_HOSTS = ('www.googleapis.com', 'storage.googleapis.com')


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def make_certificates(directory: str) -> tuple[str, str, str]:
  """(ca.pem, server.pem, server.key): a CA and a cert for the Google API hosts."""
  ca_key, ca = os.path.join(directory, 'ca.key'), os.path.join(directory, 'ca.pem')
  key, csr = os.path.join(directory, 'server.key'), os.path.join(directory, 'server.csr')
  cert, ext = os.path.join(directory, 'server.pem'), os.path.join(directory, 'san.ext')
  run = lambda *args: subprocess.run(['openssl', *args], check=True, capture_output=True)
  run(
      'req',
      '-x509',
      '-newkey',
      'rsa:2048',
      '-nodes',
      '-days',
      '2',
      '-subj',
      '/CN=ddep test CA',
      '-keyout',
      ca_key,
      '-out',
      ca,
  )
  run(
      'req',
      '-newkey',
      'rsa:2048',
      '-nodes',
      '-subj',
      '/CN=www.googleapis.com',
      '-keyout',
      key,
      '-out',
      csr,
  )
  with open(ext, 'w') as f:
    f.write('subjectAltName=' + ','.join(f'DNS:{h}' for h in GOOGLE_HOSTS) + '\n')
  run(
      'x509',
      '-req',
      '-in',
      csr,
      '-CA',
      ca,
      '-CAkey',
      ca_key,
      '-CAcreateserial',
      '-days',
      '2',
      '-extfile',
      ext,
      '-out',
      cert,
  )
  return ca, cert, key


def _relay(a: socket.socket, b: socket.socket) -> None:
  """Copies bytes both ways until either side closes."""
  sockets = [a, b]
  while True:
    # An SSL socket may hold decrypted bytes that select() cannot see.
    readable = [s for s in sockets if isinstance(s, ssl.SSLSocket) and s.pending()]
    if not readable:
      readable, _, _ = select.select(sockets, [], [], 60)
    if not readable:
      return
    for s in readable:
      try:
        data = s.recv(65536)
      except ssl.SSLWantReadError:
        continue
      if not data:
        return
      (b if s is a else a).sendall(data)


def _read_head(sock) -> bytes:
  """A request's bytes up to the end of its headers (and whatever came with them)."""
  head = b''
  while b'\r\n\r\n' not in head:
    chunk = sock.recv(65536)
    if not chunk:
      return b''
    head += chunk
  return head


def _fix_upload_head(head: bytes) -> bytes:
  """Headers of TF's upload requests as an HTTP/1.1 server would read them.

  TF sends `Transfer-Encoding: chunked` together with `Content-Length`; HTTP/1.1
  says the length is then ignored, but the emulator reads it and stores the raw
  chunk framing. `Expect` is answered by the proxy (`_send_upstream`).
  """
  headers, sep, body = head.partition(b'\r\n\r\n')
  lines = headers.split(b'\r\n')
  chunked = any(l.lower() == b'transfer-encoding: chunked' for l in lines)
  drop = (b'expect:',) + ((b'content-length:',) if chunked else ())
  return b'\r\n'.join(l for l in lines if not l.lower().startswith(drop)) + sep + body


def _send_upstream(client, upstream, head: bytes) -> None:
  """Forwards a request head; answers `Expect: 100-continue` itself, which the HTTP/1.0
  emulator never does (curl would wait a second before sending each upload's body)."""
  upstream.sendall(_fix_upload_head(head))
  headers, _, body = head.partition(b'\r\n\r\n')
  if not body and b'\r\nexpect: 100-continue' in headers.lower():
    client.sendall(b'HTTP/1.1 100 Continue\r\n\r\n')


class _ConnectProxy(socketserver.ThreadingTCPServer):
  daemon_threads = True
  allow_reuse_address = True

  def __init__(self, address, upstream, context):
    self.upstream, self.context = upstream, context
    super().__init__(address, _ConnectHandler)


class _ConnectHandler(socketserver.BaseRequestHandler):

  def handle(self):
    head = _read_head(self.request)
    if not head:
      return
    method, target = head.split(b' ', 2)[:2]
    if method == b'CONNECT':
      self._tunnel(target)
    else:
      self._forward(head, target)

  def _tunnel(self, target: bytes) -> None:
    """https: terminate TLS as the Google host, relay plain HTTP to the emulator."""
    if target.split(b':')[0].decode() not in GOOGLE_HOSTS:
      self.request.sendall(b'HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n')
      return
    self.request.sendall(b'HTTP/1.1 200 Connection established\r\n\r\n')
    with (
        self.server.context.wrap_socket(self.request, server_side=True) as client,
        socket.create_connection(self.server.upstream) as upstream,
    ):
      head = _read_head(client)
      if head:
        _send_upstream(client, upstream, head)
        _relay(client, upstream)

  def _forward(self, head: bytes, target: bytes) -> None:
    """http (the emulator's own upload URLs name the Google host): origin-form, relayed."""
    for host in GOOGLE_HOSTS:
      prefix = f'http://{host}'.encode()
      if target.startswith(prefix):
        head = head.replace(target, target[len(prefix) :] or b'/', 1)
        break
    else:
      self.request.sendall(b'HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n')
      return
    with socket.create_connection(self.server.upstream) as upstream:
      _send_upstream(self.request, upstream, head)
      _relay(self.request, upstream)


def _add_generation_headers(server) -> None:
  """Downloads answer with `x-goog-generation`, as GCS does; TensorStore needs it."""
  from gcp_storage_emulator.handlers import objects  # pylint: disable=g-import-not-at-top

  download = objects.download

  def download_with_generation(request, response, storage, *args, **kwargs):
    try:
      obj = storage.get_file_obj(request.params['bucket_name'], request.params['object_id'])
      response['x-goog-generation'] = str(obj['generation'])
      response['x-goog-metageneration'] = str(obj.get('metageneration', '1'))
    except Exception:  # pylint: disable=broad-except
      pass  # Not found: download answers 404 itself.
    return download(request, response, storage, *args, **kwargs)

  objects.download = download_with_generation  # `objects.get` calls it for alt=media.
  server.HANDLERS = tuple(
      (regex, {m: download_with_generation if f is download else f for m, f in methods.items()})
      for regex, methods in server.HANDLERS
  )


def _start_emulator(port: int, bucket: str):
  """The emulator's HTTP server, in memory, on a thread of this process."""
  from gcp_storage_emulator import server  # pylint: disable=g-import-not-at-top

  read_data = server._read_data  # pylint: disable=protected-access

  def read_data_or_empty(handler, query):
    # The emulator reads an empty body as None and then fails on len(None) in
    # media uploads; TF writes empty objects that way for directory markers.
    data = read_data(handler, query)
    return b'' if data is None and query.get('uploadType') == ['media'] else data

  server._read_data = read_data_or_empty  # pylint: disable=protected-access
  _add_generation_headers(server)
  emulator = server.create_server('127.0.0.1', port, in_memory=True, default_bucket=bucket)
  emulator._api.daemon = True  # pylint: disable=protected-access
  # One thread per connection (TensorStore writes a checkpoint's arrays in parallel);
  # http.server is patched only while the emulator's thread builds its server.
  single = server.server.HTTPServer
  server.server.HTTPServer = server.server.ThreadingHTTPServer
  try:
    emulator.start()
  finally:
    server.server.HTTPServer = single
  return emulator


class GcsEmulator:
  """Starts the emulator and the proxy; `stop()` ends both."""

  def __init__(self, directory: str, bucket: str = 'ddep-test'):
    self.bucket = bucket
    self.port = _free_port()
    self.ca, cert, key = make_certificates(directory)
    self._server = _start_emulator(self.port, bucket)
    self.url = f'http://127.0.0.1:{self.port}'
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    self._proxy = _ConnectProxy(('127.0.0.1', 0), ('127.0.0.1', self.port), context)
    self.proxy_url = f'http://127.0.0.1:{self._proxy.server_address[1]}'
    threading.Thread(target=self._proxy.serve_forever, daemon=True).start()

  @property
  def env(self) -> dict[str, str]:
    """What a process needs for TensorStore and TensorFlow to use the emulator."""
    return {
        'TENSORSTORE_GCS_HTTP_URL': self.url,
        'STORAGE_EMULATOR_HOST': self.url,  # google-cloud-storage (orbax's bucket checks).
        'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'ddep-test-token',
        'https_proxy': self.proxy_url,
        'http_proxy': self.proxy_url,
        'HTTP_PROXY': self.proxy_url,
        'HTTPS_PROXY': self.proxy_url,
        'no_proxy': '127.0.0.1,localhost',
        'NO_PROXY': '127.0.0.1,localhost',
        'CURL_CA_BUNDLE': self.ca,
        # TF's GCS client caches stats and directory listings; a second process
        # (a resume) must see what the first one wrote.
        'GCS_STAT_CACHE_MAX_AGE': '0',
        'GCS_MATCHING_PATHS_CACHE_MAX_AGE': '0',
        'GCS_READ_CACHE_MAX_SIZE_MB': '0',
    }

  def objects(self, prefix: str = '') -> list[str]:
    """Names of the bucket's objects under `prefix`, straight from the emulator."""

    names, token = [], ''
    while True:
      query = f'prefix={prefix}' + (f'&pageToken={token}' if token else '')
      with urllib.request.urlopen(f'{self.url}/storage/v1/b/{self.bucket}/o?{query}') as r:
        page = json.load(r)
      names += [item['name'] for item in page.get('items', [])]
      token = page.get('nextPageToken')
      if not token:
        return names

  def stop(self) -> None:
    self._proxy.shutdown()
    self._proxy.server_close()
    self._server.stop()
