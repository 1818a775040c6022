"""The directive reference: docs/directives.md is generated from this and the directive table.

    .venv/bin/python -m scriptlb.config.reference > docs/directives.md

``REFERENCE`` describes every directive of ``directives.DIRECTIVES`` (a test keeps the two and
the generated page in step); contexts and argument counts come from the table itself.
``REFUSED`` lists nginx directives scriptlb does not accept, on purpose, and why.
"""

from __future__ import annotations

from scriptlb.config import stream as _stream  # noqa: F401  (registers the stream directives)
from scriptlb.config.directives import DIRECTIVES, Ctx, Spec

# name -> (syntax, default, module of origin, note)
REFERENCE: dict[str, tuple[str, str, str, str]] = {
    "worker_processes": ("number | auto", "1", "core", ""),
    "daemon": ("on | off", "on", "core", ""),
    "master_process": ("on | off", "on", "core", ""),
    "pid": ("file", "logs/scriptlb.pid", "core", "relative to the prefix; missing directories are created"),
    "user": ("user [group]", "-", "core",
             "only for a master started as root: workers switch to it; unlike nginx, no `nobody` default "
             "(without the directive workers keep the master's identity); group defaults to the user's own"),
    "error_log": ("file | stderr | syslog:server=address[,facility=f][,tag=t][,nohostname] [level]",
                  "stderr error", "core / ngx_stream_core_module",
                  "nginx defaults to logs/error.log; several lines add up; in stream and its servers a "
                  "session's lines go to the server's logs (nginx's connection log); syslog: sends RFC 3164 "
                  "datagrams (default facility local7, tag nginx); memory: is refused"),
    "events": ("{ ... }", "-", "core", ""),
    "worker_connections": ("number", "512", "core (events)", ""),
    "http": ("{ ... }", "-", "ngx_http_core_module", ""),
    "stream": ("{ ... }", "-", "ngx_stream_core_module", "TCP and UDP balancing: see docs/stream.md"),
    "worker_shutdown_timeout": ("time", "0 (none)", "core",
                                "old workers' wait for open connections and stream sessions"),
    "proxy_timeout": ("time", "10m", "ngx_stream_proxy_module", "idle time between reads/writes"),
    "proxy_download_rate": ("size", "0", "ngx_stream_proxy_module",
                            "bytes/s towards the client; variables allowed (read once connected); "
                            "nginx's arithmetic: whole seconds since the session's start, one second's worth "
                            "up front"),
    "proxy_upload_rate": ("size", "0", "ngx_stream_proxy_module",
                          "bytes/s towards the peer; variables allowed, as proxy_download_rate"),
    "proxy_half_close": ("on | off", "off", "ngx_stream_proxy_module", ""),
    "proxy_protocol": ("on | off", "off", "ngx_stream_proxy_module", "PROXY v1 to the peer"),
    "proxy_requests": ("number", "0", "ngx_stream_proxy_module",
                       "udp: client datagrams after which a session stops taking its address's datagrams"),
    "proxy_responses": ("number", "-", "ngx_stream_proxy_module",
                        "udp: datagrams expected back per client datagram; the session then ends"),
    "ssl_preread": ("on | off", "off", "ngx_stream_ssl_preread_module", "SNI/ALPN without termination"),
    "server": ("{ ... } (http) / address [parameters] (upstream)", "-",
               "ngx_http_core_module / ngx_http_upstream_module",
               "upstream parameters: weight, max_fails, fail_timeout, max_conns, backup, down, "
               "slow_start, drain, resolve and service= (nginx Plus)"),
    "upstream": ("name { ... }", "-", "ngx_http_upstream_module", ""),
    "listen": ("address[:port[-port]] [default_server] [ssl] [proxy_protocol] [reuseport] [backlog=N] "
               "[sndbuf=size] [rcvbuf=size]",
               "*:80 | *:8000", "ngx_http_core_module",
               "http2 and quic are refused (HTTP/1.1 only); proxy_protocol (v1, v2) not with ssl"),
    "server_name": ("name ...", '""', "ngx_http_core_module", ""),
    "location": ("[ = | ~ | ~* | ^~ ] uri { ... }", "-", "ngx_http_core_module",
                 "may be nested (nginx's search order; a nested location inherits its parent's settings)"),
    "proxy_pass": ("URL", "-", "ngx_http_proxy_module",
                   "http://, https:// and unix:; with variables: an upstream's name, else an address, else "
                   "a name looked up with `resolver` per request"),
    "proxy_set_header": ("field value", "Host $proxy_host; Connection close", "ngx_http_proxy_module", ""),
    "proxy_http_version": ("1.0 | 1.1", "1.0", "ngx_http_proxy_module", ""),
    "proxy_connect_timeout": ("time", "60s", "ngx_http_proxy_module", ""),
    "proxy_send_timeout": ("time", "60s", "ngx_http_proxy_module", ""),
    "proxy_read_timeout": ("time", "60s", "ngx_http_proxy_module", ""),
    "proxy_next_upstream": ("error | timeout | invalid_header | http_500 | ... | non_idempotent | off ...",
                            "error timeout", "ngx_http_proxy_module", ""),
    "proxy_next_upstream_tries": ("number", "0", "ngx_http_proxy_module", ""),
    "proxy_next_upstream_timeout": ("time", "0", "ngx_http_proxy_module", ""),
    "proxy_request_buffering": ("on | off", "on", "ngx_http_proxy_module", ""),
    "proxy_buffering": ("on | off", "on", "ngx_http_proxy_module", ""),
    "client_max_body_size": ("size", "1m", "ngx_http_core_module", ""),
    "client_body_buffer_size": ("size", "8k|16k", "ngx_http_core_module", "two memory pages"),
    "client_body_temp_path": ("path [level1 [level2 [level3]]]", "client_body_temp", "ngx_http_core_module",
                              "given to the `user` at start"),
    "client_body_in_file_only": ("on | clean | off", "off", "ngx_http_core_module", ""),
    "client_body_in_single_buffer": ("on | off", "off", "ngx_http_core_module", ""),
    "client_header_buffer_size": ("size", "1k", "ngx_http_core_module", ""),
    "ignore_invalid_headers": ("on | off", "on", "ngx_http_core_module", ""),
    "underscores_in_headers": ("on | off", "off", "ngx_http_core_module", ""),
    "proxy_buffer_size": ("size", "4k|8k", "ngx_http_proxy_module", ""),
    "proxy_buffers": ("number size", "8 4k|8k", "ngx_http_proxy_module", ""),
    "proxy_busy_buffers_size": ("size", "8k|16k", "ngx_http_proxy_module", ""),
    "limit_rate": ("rate", "0", "ngx_http_core_module",
                   "proxied responses (files are written whole); `set $limit_rate` changes it per request"),
    "limit_rate_after": ("size", "0", "ngx_http_core_module", "proxied responses"),
    "proxy_limit_rate": ("rate", "0", "ngx_http_proxy_module",
                         "the body is held, and the peer not read, past the rate"),
    "proxy_max_temp_file_size": ("size", "1024m", "ngx_http_proxy_module",
                                 "accepted: responses never go to temp files (they stream with "
                                 "back-pressure, as nginx's with 0)"),
    "proxy_store": ("on | off | string", "off", "ngx_http_proxy_module",
                    "200 responses to GET; a temp file beside the target, renamed when complete"),
    "proxy_store_access": ("users:permissions ...", "user:rw", "ngx_http_proxy_module", ""),
    "keepalive_time": ("time", "1h", "ngx_http_core_module",
                       "a request on an older connection is its last; in upstream (ngx_http_upstream_"
                       "keepalive_module), a pooled connection older than this is closed when released"),
    "send_timeout": ("time", "60s", "ngx_http_core_module",
                     "upgraded (tunnelled) connections; other responses keep 60s"),
    "client_header_timeout": ("time", "60s", "ngx_http_core_module", ""),
    "client_body_timeout": ("time", "60s", "ngx_http_core_module", ""),
    "keepalive_timeout": ("timeout [header_timeout] (http) / timeout (upstream)", "75s / 60s",
                          "ngx_http_core_module / ngx_http_upstream_module", ""),
    "keepalive_requests": ("number", "1000", "ngx_http_core_module / ngx_http_upstream_module", ""),
    "large_client_header_buffers": ("number size", "4 8k", "ngx_http_core_module", ""),
    "max_headers": ("number", "1000", "ngx_http_core_module",
                    "the default server's value, as large_client_header_buffers (nginx 1.27.2)"),
    "return": ("code [text] | code URL | URL (http) / value (stream)", "-",
               "ngx_http_rewrite_module / ngx_stream_return_module",
               "stream: sends the value (with variables) and closes; the last of return and proxy_pass "
               "is the server's handler, as nginx"),
    "log_format": ("name [escape=default|json|none] string ...", "combined", "ngx_http_log_module", ""),
    "access_log": ("path [format [buffer=size] [gzip[=level]] [flush=time] [if=condition]] | off", "off",
                   "ngx_http_log_module", "nginx defaults to logs/access.log combined; gzip: each buffer "
                   "written as one gzip member (level 1, a 64k buffer unless given); a path with variables "
                   "is opened for each line (not with buffer or gzip)"),
    "open_log_file_cache": ("max=N [inactive=time] [min_uses=N] [valid=time] | off", "off",
                            "ngx_http_log_module / ngx_stream_log_module",
                            "descriptors of logs whose paths have variables (inactive 10s, min_uses 1, "
                            "valid 60s)"),
    "python_package_path": ("patterns", "-", "scriptlb (lua_package_path)", "$prefix and $hook_dir expand"),
    "python_code_cache": ("on | off", "on", "scriptlb (lua_code_cache)", ""),
    "python_memory_limit": ("size | off", "1g", "scriptlb",
                            "a hook worker's resident memory: past it, retired gracefully"),
    "python_peer_stats": ("on | off", "on", "scriptlb", "on anyway when an upstream has a health_check"),
    "balancer_by_python_timeout": ("time", "10ms", "scriptlb", "CPU budget of one hook run"),
    "balancer_by_python_fallback": ("on | off", "on", "scriptlb",
                                    "off: a failed run answers 500, as OpenResty"),
    "balancer_by_python_breaker": ("off | [fails=N] [window=time] [cooldown=time]",
                                   "fails=10 window=10s cooldown=30s", "scriptlb",
                                   "skip a hook that keeps failing, then probe it"),
    "balancer_by_python_file": ("file", "-", "scriptlb (balancer_by_lua_file)", ""),
    "balancer_by_python_block": ("{ python }", "-", "scriptlb (balancer_by_lua_block)", ""),
    "python_shared_dict": ("name size [sync=redis://HOST:PORT/DB] [sync_interval=time] [sync_prefix=P] "
                           "[sync_password_file=F]", "-", "scriptlb (lua_shared_dict)",
                           "at least 64k; sync= merges the zone with Redis across nodes (docs/cluster.md), "
                           "sync_interval defaults to 50ms, sync_prefix to scriptlb:NAME:"),
    "log_by_python_file": ("file", "-", "scriptlb (log_by_lua_file)", ""),
    "log_by_python_block": ("{ python }", "-", "scriptlb (log_by_lua_block)", ""),
    "log_by_python_timeout": ("time", "10ms", "scriptlb", ""),
    "balancer_trace_header": ("on | off", "off", "scriptlb",
                              "a client from a `balancer_trace_allow` address that sends "
                              "`X-Balancer-Trace: 1` gets `$balancer_trace` back in an `X-Balancer-Trace` "
                              "response header (proxied responses and the error pages of proxied requests); "
                              "a peer's own X-Balancer-Trace header is removed; see docs/hooks.md"),
    "balancer_trace_allow": ("address | CIDR | unix: | all ...", "-", "scriptlb",
                             "who may ask for the trace header; without it nobody may; the lines of a "
                             "level add up, an inner level's list replaces the inherited one"),
    "keepalive": ("connections", "-", "ngx_http_upstream_module", ""),
    "balancer_keepalive": ("connections", "32", "scriptlb (OpenResty's balancer_keepalive)", ""),
    "least_conn": ("", "-", "ngx_http_upstream_module", ""),
    "hash": ("key [consistent]", "-", "ngx_http_upstream_module", ""),
    "ip_hash": ("", "-", "ngx_http_upstream_module", ""),
    "random": ("[two [least_conn]]", "-", "ngx_http_upstream_module", ""),
    "least_time": ("header | last_byte [inflight]", "-", "ngx_http_upstream_module (nginx Plus)", ""),
    "ewma": ("", "-", "scriptlb (APISIX's ewma)", ""),
    "zone": ("name [size]", "-", "ngx_http_upstream_module",
             "accepted; scriptlb shares statistics, health and run-time lists without it"),
    "discovery": ("etcd=http://HOST:PORT prefix=/KEY/PREFIX/ [timeout=time]", "-", "scriptlb",
                  "needs zone: the servers are the keys under the prefix (value: JSON with the API's "
                  "fields), watched in etcd (docs/cluster.md); timeout defaults to 3s"),
    "resolver": ("address[:port] ... [valid=time] [ipv4=on|off] [ipv6=on|off]", "-", "ngx_http_core_module",
                 "used by `server NAME resolve` and by proxy_pass with variables (IP addresses only, "
                 "no status_zone); stream: names in `proxy_pass $var` values, a cached answer "
                 "starting at a random address as nginx's"),
    "resolver_timeout": ("time", "30s", "ngx_http_core_module", ""),
    "state": ("file", "-", "ngx_http_upstream_module (nginx Plus)",
              "the servers the API leaves, read at load time; replaces the block's server lines"),
    "health_check": ("[interval=T] [jitter=T] [fails=N] [passes=N] [uri=U] [port=N] [match=NAME] "
                     "[mandatory [persistent]] [type=http|tcp]", "interval=5s fails=1 passes=1 uri=/",
                     "ngx_http_upstream_hc_module (nginx Plus)",
                     "the first health_check of an upstream is used"),
    "match": ("name { ... }", "-", "ngx_http_upstream_hc_module (nginx Plus)", ""),
    "proxy_ssl_server_name": ("on | off", "off", "ngx_http_proxy_module", ""),
    "proxy_ssl_name": ("name", "host of proxy_pass", "ngx_http_proxy_module",
                       "a hook's set_current_peer(host, port, host_name) overrides it for its try"),
    "proxy_ssl_verify": ("on | off", "off", "ngx_http_proxy_module",
                         "with on, the name is also sent as SNI (Python verifies the name it sends)"),
    "proxy_ssl_trusted_certificate": ("file", "-",
                                      "ngx_http_proxy_module", "required by proxy_ssl_verify on"),
    "proxy_ssl_verify_depth": ("number", "1",
                               "ngx_http_proxy_module", "as nginx (OpenSSL's count: the intermediate CAs a "
                               "peer's chain may hold)"),
    "proxy_ssl_protocols": ("[TLSv1] [TLSv1.1] [TLSv1.2] [TLSv1.3]", "TLSv1.2 TLSv1.3",
                            "ngx_http_proxy_module", ""),
    "proxy_ssl_ciphers": ("ciphers", "DEFAULT", "ngx_http_proxy_module", ""),
    "proxy_ssl_certificate": ("file", "-", "ngx_http_proxy_module / ngx_stream_proxy_module",
                              "a client certificate for the peers; with variables, the pair is loaded "
                              "per connection (once per pair and worker), an empty value sends none"),
    "proxy_ssl_certificate_key": ("file", "-", "ngx_http_proxy_module / ngx_stream_proxy_module", ""),
    "proxy_ssl": ("on | off", "off", "ngx_stream_proxy_module",
                  "TLS to the peers of a stream server, with the proxy_ssl_* directives (http's, in stream "
                  "too); the name (proxy_ssl_name, else the host of proxy_pass) loses its port, as nginx"),
    "ssl_handshake_timeout": ("time", "60s", "ngx_stream_ssl_module", ""),
    "proxy_ssl_crl": ("file", "-", "ngx_http_proxy_module / ngx_stream_proxy_module",
                      "revoked peer certificates, checked for the whole chain (with proxy_ssl_verify on)"),
    "proxy_ssl_conf_command": ("name value", "-", "ngx_http_proxy_module / ngx_stream_proxy_module",
                               "OpenSSL's SSL_CONF_cmd, every line in order; file and directory values "
                               "against the prefix, as nginx"),
    "proxy_ssl_password_file": ("file", "-", "ngx_http_proxy_module", ""),
    "proxy_ssl_session_reuse": ("on | off", "on", "ngx_http_proxy_module",
                                "a new connection resumes the last session of its peer (by address "
                                "and TLS name; per worker)"),
    "ssl_certificate": ("file", "-",
                        "ngx_http_ssl_module", "several per server (RSA + ECDSA), paired in order with "
                        "ssl_certificate_key; `data:` and variables are not supported"),
    "ssl_certificate_key": ("file", "-", "ngx_http_ssl_module", ""),
    "ssl_protocols": ("[SSLv2] [SSLv3] [TLSv1] [TLSv1.1] [TLSv1.2] [TLSv1.3]", "TLSv1.2 TLSv1.3",
                      "ngx_http_ssl_module",
                      "a range: the lowest to the highest named (OpenSSL 3 has no SSLv2/SSLv3)"),
    "ssl_ciphers": ("ciphers", "HIGH:!aNULL:!MD5",
                    "ngx_http_ssl_module", "TLS 1.2 and below (OpenSSL's TLS 1.3 suites stay)"),
    "ssl_prefer_server_ciphers": ("on | off", "off", "ngx_http_ssl_module", ""),
    "ssl_ecdh_curve": ("curve", "auto", "ngx_http_ssl_module", "a list (X25519:prime256v1) as nginx"),
    "ssl_session_cache": ("off | none | [builtin[:size]] [shared:name:size]", "none", "ngx_http_ssl_module",
                          "off / none / builtin:N as nginx; shared:NAME:SIZE with ssl_session_tickets "
                          "off: a zone every worker reads (LMDB, under the prefix); with tickets on, "
                          "a per-worker cache of about 4000 sessions per MB, as tickets (one key "
                          "shared by every worker) resume on any worker"),
    "ssl_session_timeout": ("time", "5m", "ngx_http_ssl_module", ""),
    "ssl_session_tickets": ("on | off", "on", "ngx_http_ssl_module", ""),
    "ssl_session_ticket_key": ("file", "-",
                               "ngx_http_ssl_module", "nginx's 48- or 80-byte file; several (key "
                               "rotation): the first encrypts, all decrypt, as nginx"),
    "ssl_client_certificate": ("file", "-", "ngx_http_ssl_module", ""),
    "ssl_trusted_certificate": ("file", "-", "ngx_http_ssl_module / ngx_stream_ssl_module",
                                "CAs that verify client certificates without being named to clients"),
    "ssl_verify_client": ("on | off | optional | optional_no_ca", "off", "ngx_http_ssl_module",
                          "as nginx: the handshake finishes and requests get the 400 pages "
                          "(495/496); stream: the connection is closed after the handshake"),
    "ssl_verify_depth": ("number", "1", "ngx_http_ssl_module", ""),
    "ssl_dhparam": ("file", "-", "ngx_http_ssl_module", ""),
    "ssl_password_file": ("file", "-", "ngx_http_ssl_module", "each line is tried in turn"),
    "map": ("string $variable { ... }", "-", "ngx_http_map_module / ngx_stream_map_module",
            "strings (case-insensitive), default, `~`/`~*` regexes in order, hostnames, volatile, include; "
            "evaluated when read; regex captures ($1) in values are refused; "
            "stream's own map (docs/stream.md): strings, hostnames, regexes (with $1 and named captures "
            "in values, and after), default"),
    "status": ("[!] code[-code] ...", "-", "ngx_http_upstream_hc_module (match)", ""),
    "header": ("name [= | != | ~ | !~ value] | ! name", "-", "ngx_http_upstream_hc_module (match)", ""),
    "body": ("~ | !~ regex", "-", "ngx_http_upstream_hc_module (match)", ""),
    "send": ("string", "-", "ngx_stream_upstream_hc_module (match)", "type=tcp"),
    "expect": ("[~] string", "-", "ngx_stream_upstream_hc_module (match)", "type=tcp"),
    "allow": ("address | CIDR | unix: | all", "-", "ngx_http_access_module / ngx_stream_access_module",
              "stream: a denied session is closed at once, status 403"),
    "deny": ("address | CIDR | unix: | all", "-", "ngx_http_access_module / ngx_stream_access_module", ""),
    "geo": ("[address] $variable { ... }", "-", "ngx_http_geo_module / ngx_stream_geo_module",
            "networks (CIDR or one address, IPv4 and IPv6; the longest match wins), `ranges` (IPv4 "
            "FIRST-LAST), default, delete, include; http also proxy and proxy_recursive (X-Forwarded-For); "
            "the address may be a variable (text that is no address is 255.255.255.255, as nginx)"),
    "auth_basic": ("string | off", "off", "ngx_http_auth_basic_module", "no variables"),
    "auth_basic_user_file": ("file", "-", "ngx_http_auth_basic_module",
                             "bcrypt, {SHA}, {SSHA}, {PLAIN}, $apr1$ and $1$ hashes"),
    "stub_status": ("", "-", "ngx_http_stub_status_module", ""),
    "api": ("[write=on|off]", "write=off", "ngx_http_api_module (nginx Plus)", "version 9 paths"),
    "prometheus": ("", "-", "scriptlb (nginx-lua-prometheus)", "text exposition, see docs/architecture.md"),
    "status_zone": ("zone", "-", "ngx_http_api_module (nginx Plus)",
                    "responses by class per zone, in the metrics"),
    "add_header": ("name value [always]", "-", "ngx_http_headers_module",
                   "compiled at load; a level's lines replace the inherited ones"),
    "error_page": ("code ... [=[response]] uri", "-", "ngx_http_core_module",
                   "internal (a location or @name) or external redirect; one per request"),
    "proxy_intercept_errors": ("on | off", "off", "ngx_http_proxy_module", ""),
    "proxy_method": ("method", "-", "ngx_http_proxy_module", ""),
    "proxy_pass_request_headers": ("on | off", "on", "ngx_http_proxy_module", ""),
    "proxy_pass_request_body": ("on | off", "on", "ngx_http_proxy_module", ""),
    "proxy_set_body": ("value", "-", "ngx_http_proxy_module", ""),
    "proxy_hide_header": ("field", "-", "ngx_http_proxy_module", ""),
    "proxy_pass_header": ("field", "-", "ngx_http_proxy_module",
                          "Server, Date and the framing headers stay scriptlb's own"),
    "proxy_ignore_headers": ("field ...", "-", "ngx_http_proxy_module",
                             "accepted: scriptlb neither caches nor follows X-Accel-*"),
    "set": ("$variable value", "-", "ngx_http_rewrite_module / ngx_stream_set_module",
            "compiled at load; stream: run in order before the content (return, proxy_pass), and may "
            "overwrite a map's or split_clients' value"),
    "split_clients": ("string $variable { percent value; ... * value; }", "-",
                      "ngx_stream_split_clients_module",
                      "MurmurHash2 of the string, as nginx (the same clients get the same part)"),
    "if": ("(condition) { ... }", "-", "ngx_http_rewrite_module",
           "$var, = / != (a literal), ~ ~* !~ !~* (captures $1..$9); no file tests; set, rewrite, "
           "break and return inside; in a location also proxy_pass (no URI part), add_header, add_trailer, "
           "expires, access_log, ssi: the block is then the location the request goes on in"),
    "rewrite": ("regex replacement [last | break | redirect | permanent]", "-",
                "ngx_http_rewrite_module", ""),
    "break": ("", "-", "ngx_http_rewrite_module", ""),
    "root": ("path", "html", "ngx_http_core_module",
             "static files of a location without proxy_pass/return: GET/HEAD, read whole (64m at most)"),
    "index": ("file ...", "index.html", "ngx_http_index_module", "no variables"),
    "ssi": ("on | off", "off", "ngx_http_ssi_module",
            "static files and proxied responses (collected whole); include virtual/file (set, wait), "
            "echo, set, config, if/elif/else/endif; a subrequest runs in-process, one after another"),
    "ssi_types": ("mime-type ...", "text/html", "ngx_http_ssi_module", ""),
    "ssi_silent_errors": ("on | off", "off", "ngx_http_ssi_module", ""),
    "ssi_last_modified": ("on | off", "off", "ngx_http_ssi_module", ""),
    "ssi_value_length": ("length", "256", "ngx_http_ssi_module", ""),
    "ssi_min_file_chunk": ("size", "1k", "ngx_http_ssi_module", "accepted, unused (files are read whole)"),
    "add_trailer": ("name value [always]", "-", "ngx_http_headers_module",
                    "trailers of chunked responses to HTTP/1.1 clients (the response is then chunked)"),
    "expires": ("[modified] time | epoch | max | off", "off", "ngx_http_headers_module",
                "@time of day, negative times, variables; replaces the response's Expires and Cache-Control"),
    "try_files": ("file ... uri | file ... =code", "-", "ngx_http_core_module",
                  "a name ending in / tests a directory; the fallback may be @name"),
    "limit_except": ("method ... { ... }", "-", "ngx_http_core_module",
                     "allow, deny, auth_basic, auth_basic_user_file and proxy_pass (no URI part) inside"),
    "alias": ("path", "-", "ngx_http_core_module",
              "replaces the location's prefix (a regex location's alias names the file); no variables"),
    "absolute_redirect": ("on | off", "on", "ngx_http_core_module",
                          "Location of return, directory and automatic redirects, and of proxy_redirect"),
    "server_name_in_redirect": ("on | off", "off", "ngx_http_core_module", ""),
    "port_in_redirect": ("on | off", "on", "ngx_http_core_module", ""),
    "proxy_redirect": ("default | off | redirect replacement", "default", "ngx_http_proxy_module",
                       "Location and Refresh; prefix, ~regex, ~*regex; variables in both"),
    "proxy_bind": ("address | off", "off", "ngx_http_proxy_module / ngx_stream_proxy_module",
                   "variables allowed (an empty value binds nothing); no transparent"),
    "proxy_cookie_domain": ("off | domain replacement", "off", "ngx_http_proxy_module", ""),
    "proxy_cookie_path": ("off | path replacement", "off", "ngx_http_proxy_module", ""),
    "proxy_cookie_flags": ("off | cookie [flag ...]", "off", "ngx_http_proxy_module",
                           "secure, httponly, samesite=strict|lax|none and their no- forms"),
    "proxy_temp_path": ("path [level1 [level2 [level3]]]", "proxy_temp", "ngx_http_proxy_module",
                        "accepted: responses are streamed, never buffered to disk"),
    "connection_pool_size": ("size", "256|512", "ngx_http_core_module", "accepted, unused"),
    "request_pool_size": ("size", "4k", "ngx_http_core_module", "accepted, unused"),
    "server_names_hash_bucket_size": ("size", "32|64|128", "ngx_http_core_module", "accepted, unused"),
    "server_names_hash_max_size": ("size", "512", "ngx_http_core_module", "accepted, unused"),
    "variables_hash_bucket_size": ("size", "64", "ngx_http_core_module", "accepted, unused"),
    "variables_hash_max_size": ("size", "1024", "ngx_http_core_module", "accepted, unused"),
    "types_hash_bucket_size": ("size", "64", "ngx_http_core_module", "accepted, unused"),
    "types_hash_max_size": ("size", "1024", "ngx_http_core_module", "accepted, unused"),
    "sendfile": ("on | off", "off", "ngx_http_core_module", "accepted, unused"),
    "tcp_nopush": ("on | off", "off", "ngx_http_core_module", "accepted, unused"),
    "tcp_nodelay": ("on | off", "on", "ngx_http_core_module / ngx_stream_core_module",
                    "http: accepted, scriptlb always sets TCP_NODELAY; "
                    "stream: set on both sides of a session"),
    "keepalive_disable": ("none | browser ...", "msie6", "ngx_http_core_module",
                          "msie6: POSTs from MSIE 4-6 (not 6 SV1); safari: Safari on Mac OS X"),
    "set_real_ip_from": ("address | CIDR | unix: | name", "-",
                         "ngx_http_realip_module / ngx_stream_realip_module",
                         "a name stands for the addresses it resolves to at load time; stream: a trusted "
                         "sender's PROXY header gives $remote_addr/$remote_port ($realip_remote_addr keeps "
                         "the connection's)"),
    "real_ip_header": ("field | X-Real-IP | X-Forwarded-For | proxy_protocol", "X-Real-IP",
                       "ngx_http_realip_module", "the server's settings apply before the rewrite phase, "
                       "a location's after it (nginx's post-read and preaccess phases)"),
    "real_ip_recursive": ("on | off", "off", "ngx_http_realip_module", ""),
    "limit_req_zone": ("key zone=name:size rate=rate", "-", "ngx_http_limit_req_module",
                       "the zone is shared by every worker (LMDB under the prefix, kept across reloads); "
                       "no sync parameter"),
    "limit_req": ("zone=name [burst=number] [nodelay | delay=number]", "-", "ngx_http_limit_req_module", ""),
    "limit_req_status": ("code", "503", "ngx_http_limit_req_module", ""),
    "limit_req_log_level": ("info | notice | warn | error", "error", "ngx_http_limit_req_module", ""),
    "limit_req_dry_run": ("on | off", "off", "ngx_http_limit_req_module", ""),
    "limit_conn_zone": ("key zone=name:size", "-",
                        "ngx_http_limit_conn_module / ngx_stream_limit_conn_module",
                        "shared by every worker, as limit_req_zone (stream's zones apart from http's)"),
    "limit_conn": ("zone number", "-", "ngx_http_limit_conn_module / ngx_stream_limit_conn_module",
                   "counts a key's requests from the preaccess phase to the end of the log phase; "
                   "stream: its sessions, a rejected one is closed with status 503"),
    "limit_conn_status": ("code", "503", "ngx_http_limit_conn_module", ""),
    "limit_conn_log_level": ("info | notice | warn | error", "error", "ngx_http_limit_conn_module", ""),
    "limit_conn_dry_run": ("on | off", "off", "ngx_http_limit_conn_module", ""),
}

# nginx directives scriptlb refuses on purpose (an "unknown directive" error), and why
REFUSED: dict[str, str] = {
    "http2, quic": "HTTP/1.x only",
    "proxy_cache*": "a load balancer, not a cache: responses are streamed",
    "gzip*, sub_filter": "responses pass as the peer sent them",
    "fastcgi_*, uwsgi_*, scgi_*, grpc_*, memcached_*": "HTTP/1.x peers only",
    "*_by_lua*": "the hooks are Python: *_by_python*",
    "autoindex": "no directory listings: static files are root/alias, index and try_files",
}


def _contexts(specs: tuple[Spec, ...]) -> str:
    names = []
    for spec in specs:
        for ctx in (Ctx.MAIN, Ctx.EVENTS, Ctx.HTTP, Ctx.SERVER, Ctx.LOCATION, Ctx.IF, Ctx.UPSTREAM,
                    Ctx.MATCH, Ctx.STREAM, Ctx.STREAM_SERVER, Ctx.STREAM_UPSTREAM):
            if spec.contexts & ctx and ctx.name is not None and ctx.name.lower() not in names:
                names.append(ctx.name.lower())
    return ", ".join(names)


def render() -> str:
    """The text of docs/directives.md."""
    lines = [
        "# Directives",
        "",
        "Generated from the directive table (`python -m scriptlb.config.reference > docs/directives.md`;",
        "tests/test_reference.py keeps it complete). Syntax, units, defaults and error messages are",
        "nginx's unless the note says otherwise. `include` is handled by the parser, in every context.",
        "",
        "| Directive | Context | Syntax | Default | Origin | Note |",
        "|---|---|---|---|---|---|",
    ]
    for name in sorted(DIRECTIVES):
        syntax, default, origin, note = REFERENCE[name]
        cells = [f"`{name}`", _contexts(DIRECTIVES[name]), f"`{syntax}`" if syntax else "", f"`{default}`",
                 origin, note]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    lines += ["", "## nginx directives refused on purpose", "",
              "They are `unknown directive` errors (file:line), never silently ignored.", ""]
    lines += [f"- `{names}`: {why}." for names, why in REFUSED.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import sys

    sys.stdout.write(render())
