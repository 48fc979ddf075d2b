// heap-api (npm) pointed at the relay: its URLs are hard-coded, so each request's URL is rewritten.
//     node send_heap.js RELAY APP_ID IDENTITY   (from a directory whose node_modules holds heap-api)
const [relay, appId, identity] = process.argv.slice(2);
const heap = require(require.resolve('heap-api', { paths: [process.cwd()] }))(appId);
const send = heap._request.bind(heap);
heap._request = (options, callback) =>
  send({ ...options, url: options.url.replace('https://heapanalytics.com', relay) }, callback);
heap.track('Signed Up', identity, { plan: 'pro' })
  .then(() => heap.addUserProperties(identity, { email: `${identity}@example.com` }))
  .then(() => console.log('heap-api: ok'), (e) => { console.error('heap-api:', e.message); process.exit(1); });
