# shellcheck shell=bash
# Part "certs" of scripts/clusters.sh: a test CA, server and client certificates,
# and the wrong ones the "refuses a mismatched server" tests need. Sourced, not run.
#
#   ca.crt/ca.key             the CA every server and the client cert chain to
#   server.crt/server.key     SAN localhost, 127.0.0.1, ::1 (serverAuth)
#   client.crt/client.key     CN vsc-client (clientAuth); client.p12 the same, empty password
#   wrong-ca.crt/.key         another CA: a client trusting only it refuses every server here
#   wrong-host.crt/.key       signed by ca.crt but for wrong.invalid only (served on Redis 6391)

CERTS="$STATE/certs"

_certs_ext() { # file, extendedKeyUsage, subjectAltName
  cat >"$1" <<EXT
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = $2
subjectAltName = $3
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
EXT
}

_certs_ca() { # name, CN
  cat >"$CERTS/$1.cnf" <<CNF
[req]
distinguished_name = dn
prompt = no
x509_extensions = v3_ca
[dn]
CN = $2
[v3_ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
CNF
  openssl req -x509 -new -newkey rsa:2048 -nodes -days 3650 -sha256 \
    -config "$CERTS/$1.cnf" -keyout "$CERTS/$1.key" -out "$CERTS/$1.crt" 2>/dev/null
}

_certs_leaf() { # name, CN, CA name, extendedKeyUsage, subjectAltName
  openssl req -new -newkey rsa:2048 -nodes -subj "/CN=$2" \
    -keyout "$CERTS/$1.key" -out "$CERTS/$1.csr" 2>/dev/null
  _certs_ext "$CERTS/$1.ext" "$4" "$5"
  openssl x509 -req -in "$CERTS/$1.csr" -CA "$CERTS/$3.crt" -CAkey "$CERTS/$3.key" \
    -CAcreateserial -days 825 -sha256 -extfile "$CERTS/$1.ext" -out "$CERTS/$1.crt" 2>/dev/null
  rm -f "$CERTS/$1.csr" "$CERTS/$1.ext"
}

certs_up() {
  [ -f "$CERTS/.complete" ] && openssl x509 -checkend 86400 -noout -in "$CERTS/server.crt" >/dev/null 2>&1 \
    && openssl x509 -checkend 86400 -noout -in "$CERTS/ca.crt" >/dev/null 2>&1
}

certs_start() {
  if certs_up; then echo "certs: present in $CERTS"; return 0; fi
  rm -rf "$CERTS" && mkdir -p "$CERTS"
  _certs_ca ca "vsc clusters test CA"
  _certs_ca wrong-ca "vsc clusters WRONG CA"
  _certs_leaf server localhost ca serverAuth "DNS:localhost, IP:127.0.0.1, IP:::1"
  _certs_leaf client vsc-client ca clientAuth "DNS:vsc-client"
  _certs_leaf wrong-host wrong.invalid ca serverAuth "DNS:wrong.invalid"
  # PKCS#12 for clients that want one (lapin): SHA1/3DES, readable without OpenSSL's legacy provider.
  openssl pkcs12 -export -in "$CERTS/client.crt" -inkey "$CERTS/client.key" -certfile "$CERTS/ca.crt" \
    -keypbe PBE-SHA1-3DES -certpbe PBE-SHA1-3DES -macalg sha1 -passout pass: -out "$CERTS/client.p12"
  rm -f "$CERTS"/*.srl "$CERTS"/*.cnf
  openssl verify -CAfile "$CERTS/ca.crt" "$CERTS/server.crt" "$CERTS/client.crt" "$CERTS/wrong-host.crt" >/dev/null
  touch "$CERTS/.complete"
  echo "certs: made in $CERTS"
}

certs_stop() { :; } # kept across stop: the tests' env keeps pointing at them
certs_status() { if certs_up; then echo "certs: present ($CERTS)"; else echo "certs: missing"; return 1; fi; }
certs_env() {
  echo "APP__TLS__CA_FILE=$CERTS/ca.crt"
  echo "APP__TLS__CLIENT_CERT_FILE=$CERTS/client.crt"
  echo "APP__TLS__CLIENT_KEY_FILE=$CERTS/client.key"
  echo "CLUSTER_TLS_CLIENT_P12=$CERTS/client.p12"
  echo "CLUSTER_TLS_WRONG_CA_FILE=$CERTS/wrong-ca.crt"
}
