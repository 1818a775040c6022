# Consistent hashing by URI with a ring built once per worker in a module (hooks/lib/ring.py):
# adding or removing a server moves only the URIs of that server.
#
#   http {
#       python_package_path "hooks/lib/?.py";
#       upstream backend {
#           server 127.0.0.1:9001;
#           server 127.0.0.1:9002;
#           balancer_by_python_file hooks/consistent_hash.py;
#       }
#   }

import ring

balancer.set_current_peer(ring.pick(upstream.get_primary_peers(), ngx.var.uri))
