// Sends track, identify, page, screen, group and alias through one Node Segment-API library to HOST (a relay, or
// capture_server.py); exits 0 only when the library reported no error.
//
//     node send_node.js segment|rudder HOST WRITE_KEY USER_ID
// (run from a directory whose node_modules holds @segment/analytics-node or @rudderstack/rudder-sdk-node)
const [lib, host, writeKey, user] = process.argv.slice(2);
const errors = [];
const load = (m) => require(require.resolve(m, { paths: [process.cwd()] }));
process.on('unhandledRejection', (e) => { errors.push(String(e)); });

async function main() {
  if (lib === 'segment') {
    const { Analytics } = load('@segment/analytics-node');
    const version = load('@segment/analytics-node/package.json').version;
    const a = new Analytics({ writeKey, host, maxRetries: 2, flushAt: 6 });
    a.on('error', (e) => errors.push(String(e && (e.reason || e.message || e.code) || e)));
    a.track({ userId: user, event: 'Signed Up', properties: { plan: 'pro', seats: 3 }, messageId: `node-segment-track-${user}` });
    a.identify({ userId: user, traits: { email: `${user}@example.com` }, messageId: `node-segment-identify-${user}` });
    a.page({ userId: user, category: 'Docs', name: 'Pricing', properties: { path: '/pricing' }, messageId: `node-segment-page-${user}` });
    a.screen({ userId: user, name: 'Home', properties: { tab: 1 }, messageId: `node-segment-screen-${user}` });
    a.group({ userId: user, groupId: 'org-1', traits: { name: 'Acme' }, messageId: `node-segment-group-${user}` });
    a.alias({ userId: user, previousId: 'old-' + user, messageId: `node-segment-alias-${user}` });
    await a.closeAndFlush({ timeout: 10000 });
    console.log(`@segment/analytics-node ${version}: errors=${JSON.stringify(errors)}`);
  } else {
    const Analytics = load('@rudderstack/rudder-sdk-node');
    const version = load('@rudderstack/rudder-sdk-node/package.json').version;
    const a = new Analytics(writeKey, { dataPlaneUrl: host, flushAt: 6, retryCount: 2, errorHandler: (e) => errors.push(String(e)) });
    const cb = (e) => { if (e) errors.push(String(e)); };
    a.track({ userId: user, event: 'Signed Up', properties: { plan: 'pro', seats: 3 }, messageId: `node-rudder-track-${user}` }, cb);
    a.identify({ userId: user, traits: { email: `${user}@example.com` }, messageId: `node-rudder-identify-${user}` }, cb);
    a.page({ userId: user, category: 'Docs', name: 'Pricing', properties: { path: '/pricing' }, messageId: `node-rudder-page-${user}` }, cb);
    a.screen({ userId: user, name: 'Home', properties: { tab: 1 }, messageId: `node-rudder-screen-${user}` }, cb);
    a.group({ userId: user, groupId: 'org-1', traits: { name: 'Acme' }, messageId: `node-rudder-group-${user}` }, cb);
    a.alias({ userId: user, previousId: 'old-' + user, messageId: `node-rudder-alias-${user}` }, cb);
    await new Promise((resolve) => a.flush((e) => { if (e) errors.push(String(e)); resolve(); }));
    console.log(`@rudderstack/rudder-sdk-node ${version}: errors=${JSON.stringify(errors)}`);
  }
  process.exit(errors.length ? 1 : 0);
}
main().catch((e) => { console.error(e); process.exit(1); });
