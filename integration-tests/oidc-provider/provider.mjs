// A real OpenID Provider on 127.0.0.1 for pgbastion's integration tests: client_credentials
// with a resource indicator yields RFC 9068 JWT access tokens (typ at+jwt, RS256).
// Prints "listening <issuer>" once ready; stops when stdin closes (the test process ended).
import http from 'node:http';
import Provider, { errors } from 'oidc-provider';

const RESOURCE = 'urn:pgbastion';
const server = http.createServer();

server.listen(0, '127.0.0.1', () => {
  const issuer = `http://127.0.0.1:${server.address().port}`;
  const provider = new Provider(issuer, {
    clients: [{
      client_id: 'reporting-service',
      client_secret: 'a-client-secret-for-tests-only-0123456789',
      grant_types: ['client_credentials'],
      redirect_uris: [],
      response_types: [],
    }],
    features: {
      clientCredentials: { enabled: true },
      resourceIndicators: {
        enabled: true,
        defaultResource: () => RESOURCE,
        useGrantedResource: () => true,
        getResourceServerInfo: (ctx, resource) => {
          // An unknown resource must be refused with InvalidTarget (anything else is a 500).
          if (resource !== RESOURCE) throw new errors.InvalidTarget();
          return { scope: 'postgres', audience: 'pgbastion', accessTokenFormat: 'jwt', accessTokenTTL: 600 };
        },
      },
    },
  });
  server.on('request', provider.callback());
  console.log(`listening ${issuer}`);
});

process.stdin.resume();
process.stdin.on('end', () => process.exit(0));
